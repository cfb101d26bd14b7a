"""`genpipe promote`, `rollback` and `models` as a user runs them, against a real sqlite MLflow store."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from components.registry.promote import PREVIOUS_TAG
from components.registry.registry import CHAMPION, set_alias, version_by_alias
from tests.components.registry.test_promote import add_evaluated, empty_db, rows  # noqa: F401 - a fixture
from tests.conftest import project_env, run


@pytest.fixture
def workspace(tmp_path: Path, request) -> tuple[Path, str]:
    """A folder with a params file pointing at its own sqlite store (a copy of an empty one: a new
    store runs every schema migration, seconds each time), as the working directory."""
    shutil.copy(request.getfixturevalue("empty_db"), tmp_path / "mlflow.db")
    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n")
    return tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def genpipe(workspace, monkeypatch):
    """`genpipe ARGS` in this process (click's runner over the real app) from the workspace: what a
    subprocess would do but its ~4 s of imports; each test keeps real subprocesses where the exit
    status and stderr line of a separate process are the point."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.chdir(workspace[0])
    for key in ("MLFLOW_TRACKING_URI", "GENPIPE_ROOT"):
        monkeypatch.delenv(key, raising=False)

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, f"genpipe {' '.join(args)}: {result.exit_code}\n{result.output}"
        return result.stdout

    return invoke


def _champion(uri: str, name: str = "genpipe-diffusion") -> str | None:
    return version_by_alias(tracking_uri=uri, name=name, alias=CHAMPION)


def test_dry_run_promote_report_refusal_rollback(workspace, genpipe):
    root, uri = workspace
    v1 = add_evaluated(uri, root, fid_over_floor=2.0, cond_accuracy=0.9)
    run(["genpipe", "promote", "diffusion_pixel"], root)  # no champion yet: the challenger becomes it
    assert _champion(uri) == v1
    v2 = add_evaluated(uri, root, fid_over_floor=1.5, cond_accuracy=0.95)
    report = (root / "reports" / "promote.json").read_text()

    out = genpipe("promote", "genpipe-diffusion", "--dry-run")
    assert "promote" in out and "nothing changed" in out
    assert _champion(uri) == v1 and (root / "reports" / "promote.json").read_text() == report
    assert not any(k.startswith("promote.") for k in rows(uri)[v2]["tags"])

    out = genpipe("promote", "genpipe-diffusion", "--margin", "0.6")
    assert "keep the champion" in out and _champion(uri) == v1  # better by 0.5 only
    genpipe("promote", "genpipe-diffusion", "--metric", "cond_accuracy")
    assert _champion(uri) == v2 and rows(uri)[v2]["tags"][PREVIOUS_TAG] == v1

    # A second model accumulates beside the first; figures from another evaluator are refused.
    w1 = add_evaluated(uri, root, name="genpipe-vae", fid_over_floor=3.0)
    genpipe("promote", "vae")
    add_evaluated(uri, root, name="genpipe-vae", fid_over_floor=1.0, evaluator="f" * 64)
    proc = run(["genpipe", "promote", "vae"], root, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "different evaluators" in proc.stderr and _champion(uri, "genpipe-vae") == w1

    report = json.loads((root / "reports" / "promote.json").read_text())
    assert set(report) == {"genpipe-diffusion", "genpipe-vae"}
    entry = report["genpipe-diffusion"]
    assert (entry["decision"], entry["challenger"], entry["champion"]) == ("promoted", v2, v1)
    assert (entry["metric"], entry["challenger_value"], entry["champion_value"]) == (
        "cond_accuracy",
        0.95,
        0.9,
    )
    assert entry["rule"] and entry["user"] and entry["time"].endswith("+00:00")
    assert entry["evaluator_sha256"] == rows(uri)[v2]["tags"]["eval.evaluator_sha256"]

    genpipe("rollback", "diffusion_pixel")
    assert _champion(uri) == v1
    assert json.loads((root / "reports" / "promote.json").read_text())["genpipe-diffusion"]["to"] == v1
    proc = run(["genpipe", "rollback", "diffusion_pixel"], root, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "nothing to roll back" in proc.stderr and _champion(uri) == v1


def test_models_table_and_lineage(workspace, genpipe):
    root, uri = workspace
    v1 = add_evaluated(uri, root, fid_over_floor=1.25, cond_accuracy=0.97)
    set_alias(tracking_uri=uri, name="genpipe-diffusion", alias=CHAMPION, version=v1)
    out = genpipe("models")
    line = next(x for x in out.splitlines() if x.startswith("genpipe-diffusion"))
    assert "challenger,champion" in line and "1.25" in line and "0.97" in line and "fid_over_floor" in out
    out = genpipe("models", "--lineage", "diffusion_pixel@champion")
    assert "git_commit: abc123" in out and f"eval.evaluator_sha256: {'e' * 64}" in out
    assert "ray_run_name: -" in out  # not a tag of this version
    proc = run(["genpipe", "models", "--lineage", "genpipe-diffusion@nobody"], root, check=False)
    assert proc.returncode == 1 and "no version of genpipe-diffusion with alias nobody" in proc.stderr


def test_two_racing_cli_promotions_end_consistent(workspace):
    root, uri = workspace
    v1 = add_evaluated(uri, root, fid_over_floor=2.0)
    set_alias(tracking_uri=uri, name="genpipe-diffusion", alias=CHAMPION, version=v1)
    v2 = add_evaluated(uri, root, fid_over_floor=1.0)
    racers = [
        subprocess.Popen(
            ["genpipe", "promote", "diffusion_pixel"],
            cwd=root,
            env=project_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in racers]
    # Each decides inside the lock: the winner promotes; the loser finds v2 already champion, where it
    # would have put it, and exits 0 (a no-op). Never two promotions, never a torn state.
    assert all(o[0] == 0 and "champion is v2" in o[1] for o in outs), outs
    winners = [o for o in outs if "-> reports/promote.json" in o[1]]
    assert len(winners) == 1, outs
    loser = next(o for o in outs if o is not winners[0])
    assert "already champion" in loser[1] and "unchanged" in loser[1], outs
    tags = rows(uri)[v2]["tags"]
    assert (
        _champion(uri) == v2
        and tags[PREVIOUS_TAG] == v1
        and json.loads(tags["promote.record"])["against"] == v1
    )
    entry = json.loads((root / "reports" / "promote.json").read_text())["genpipe-diffusion"]
    assert (entry["decision"], entry["champion"], entry["challenger"]) == ("promoted", v1, v2)
