"""`genpipe results`: README.md and BENCHMARKS.md carry the table of the committed reports, and drift fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from components.data.config import PrepareConfig
from pipelines import results
from pipelines.lineage import ROOT_ENV
from tests.conftest import REPO, run


def test_committed_docs_agree_with_committed_reports(monkeypatch):
    monkeypatch.setenv(ROOT_ENV, str(REPO))
    assert results.main(check=True) == []


@pytest.fixture
def docs(tmp_path: Path, monkeypatch) -> Path:
    """The documents and reports the command reads, copied into a scratch root."""
    for name in results.DOCUMENTS:
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "reports", tmp_path / "reports", ignore=shutil.ignore_patterns("*.png", "*.csv"))
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    return tmp_path


def _outside_markers(text: str) -> tuple[str, str]:
    return text.split(results.BEGIN)[0], text.split(results.END)[1]


def test_changed_report_changes_the_table_and_check_catches_it(docs: Path):
    summary_path = docs / "reports/evaluate.json"
    summary = json.loads(summary_path.read_text())
    summary["genpipe-gan"]["fid_over_floor"] = 1.234567
    summary["genpipe-gan"]["recall"] = 0.5
    summary_path.write_text(json.dumps(summary))
    train = docs / "reports/train_gan.json"
    train.write_text(json.dumps(json.loads(train.read_text()) | {"train_seconds": 123.4}))
    before = {name: (docs / name).read_text() for name in results.DOCUMENTS}

    with pytest.raises(RuntimeError, match=r"README\.md, BENCHMARKS\.md drift from reports/evaluate\.json"):
        results.main(check=True)
    assert {name: (docs / name).read_text() for name in results.DOCUMENTS} == before  # check writes nothing

    assert results.main() == list(results.DOCUMENTS)
    for name in results.DOCUMENTS:
        text = (docs / name).read_text()
        assert _outside_markers(text) == _outside_markers(before[name])  # only the table moved
        (row,) = [line for line in text.splitlines() if "| genpipe-gan |" in line]
        cells = [c.strip() for c in row.strip("|").split("|")]
        fid = f"{summary['genpipe-gan']['fid']:.4f}"  # unchanged: from the committed report
        assert cells[:4] == ["GAN (DCGAN)", "genpipe-gan", fid, "1.23"]
        assert cells[6] == "0.50" and cells[9] == "123"  # recall; train s from train_gan.json
    assert results.main(check=True) == [] and results.main() == []  # idempotent


def test_bits_per_dim_order_follows_the_reports(docs: Path):
    summary_path = docs / "reports/evaluate.json"
    summary = json.loads(summary_path.read_text())
    summary["genpipe-pixelcnn"]["bits_per_dim"] = 9.0  # now the worst
    summary_path.write_text(json.dumps(summary))
    results.main()
    (line,) = [x for x in (docs / "README.md").read_text().splitlines() if x.startswith("Test bits/dim")]
    vae, flow = summary["genpipe-vae"]["bits_per_dim"], summary["genpipe-flow"]["bits_per_dim"]
    assert line.endswith("< PixelCNN 9.000.") and f"VAE {vae:.3f} (a bound)" in line
    assert line.index("flow") < line.index("VAE") if flow < vae else line.index("VAE") < line.index("flow")


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        f"{results.END}\n{results.BEGIN}\n",
        f"{results.BEGIN}\n{results.BEGIN}\n{results.END}\n",
    ],
)
def test_bad_markers_are_an_error_naming_the_document(text: str):
    with pytest.raises(ValueError, match=r"^README\.md: needs one <!-- results:begin --> line"):
        results.splice(text, "table", document="README.md")


def test_splice_keeps_everything_outside_the_markers():
    text = f"head\n{results.BEGIN}\nold\nrows\n{results.END}\ntail\n"
    assert results.splice(text, "new\n", document="x") == f"head\n{results.BEGIN}\nnew\n{results.END}\ntail\n"


def test_cli_check_fails_with_one_line(docs: Path):
    readme = docs / "README.md"
    readme.write_text(readme.read_text().replace("| genpipe-vae |", "| genpipe-vae-edited |"))
    proc = run(["genpipe", "results", "--check"], docs, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genpipe: error: results: README.md drift")
    run(["genpipe", "results"], docs)
    assert run(["genpipe", "results", "--check"], docs).returncode == 0


def _edit_gan_fid(docs: Path) -> None:
    summary_path = docs / "reports/evaluate.json"
    summary = json.loads(summary_path.read_text())
    summary["genpipe-gan"]["fid_over_floor"] = 7.654321
    summary_path.write_text(json.dumps(summary))


def test_reports_from_other_data_leave_the_docs_alone(docs: Path, capsys):
    """A user's own data (here in params.yaml) writes no tracked doc unless --write-docs asks."""
    _edit_gan_fid(docs)
    (docs / "params.yaml").write_text(
        "prepare: {source: 'imagefolder:/data/pets', image_size: 32, channels: 3}\n"
    )
    before = {name: (docs / name).read_text() for name in results.DOCUMENTS}
    assert results.main() == []
    assert {name: (docs / name).read_text() for name in results.DOCUMENTS} == before
    out = capsys.readouterr().out
    assert "prepare.source=imagefolder:/data/pets, prepare.image_size=32, prepare.channels=3" in out
    assert "README.md, BENCHMARKS.md left alone" in out and "--write-docs" in out
    with pytest.raises(RuntimeError, match="drift"):  # --check still compares
        results.main(check=True)
    assert results.main(write_docs=True) == list(results.DOCUMENTS)
    assert "| 7.65 |" in (docs / "README.md").read_text()


def test_the_prepared_data_decides_over_params(docs: Path):
    """meta.json records what the reports were made from: the default there rewrites the docs."""
    _edit_gan_fid(docs)
    (docs / "params.yaml").write_text("prepare: {source: 'builtin:glyphs', image_size: 32, channels: 3}\n")
    (docs / "data/processed").mkdir(parents=True)
    meta = {"prepare": PrepareConfig().model_dump(mode="json")}
    (docs / "data/processed/meta.json").write_text(json.dumps(meta))
    assert results.main() == list(results.DOCUMENTS)
    meta["prepare"]["source"] = "builtin:shapes"
    (docs / "data/processed/meta.json").write_text(json.dumps(meta))
    assert results.custom_data(docs) == "prepare.source=builtin:shapes"


def test_cli_write_docs(docs: Path):
    _edit_gan_fid(docs)
    (docs / "params.yaml").write_text("prepare: {source: 'builtin:shapes', channels: 3}\n")
    proc = run(["genpipe", "results"], docs)
    assert "left alone" in proc.stdout and "| 7.65 |" not in (docs / "README.md").read_text()
    run(["genpipe", "results", "--write-docs"], docs)
    assert "| 7.65 |" in (docs / "README.md").read_text()
