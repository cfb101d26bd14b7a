"""Rollback that holds through the always-run promote stage, the decision history, every named model
decided, the lock's settings and wait message, and lineage's `-dirty` flag from the code alone."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.registry.promote import history, registry_lock
from components.registry.registry import CHAMPION, set_alias, version_by_alias
from pipelines import promote
from pipelines.lineage import ROOT_ENV, git_commit
from tests.components.registry.test_promote import add_evaluated, empty_db  # noqa: F401 - the fixture
from tests.conftest import REPO, run


@pytest.fixture
def workspace(tmp_path: Path, request) -> tuple[Path, str]:
    """A folder with a params file pointing at its own sqlite store (a copy of an empty one: creating
    a store runs every schema migration, seconds each time)."""
    shutil.copy(request.getfixturevalue("empty_db"), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(f"mlflow:\n  tracking_uri: {uri}\n")
    return tmp_path, uri


def stage_command() -> list[str]:
    """What dvc.yaml runs for the promote stage (always run by `dvc repro`)."""
    cmd = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["promote"]["cmd"])
    assert cmd[:2] == ["genpipe", "promote"] and len(cmd) > 3
    return cmd


def test_rollback_holds_through_the_promote_stage(workspace, monkeypatch, capsys):
    root, uri = workspace
    cmd = stage_command()
    names = {model: promote.resolve(model) for model in cmd[2:]}
    for name in names.values():  # every model the stage names has an evaluated champion
        v1 = add_evaluated(uri, root, name=name, fid_over_floor=2.0)
        set_alias(tracking_uri=uri, name=name, alias=CHAMPION, version=v1)
    v2 = add_evaluated(uri, root, name="genpipe-diffusion", fid_over_floor=1.0)
    monkeypatch.chdir(root)  # in-process here (the CLI's own code; each `genpipe` costs ~5 s of imports)
    assert (
        promote.main_many(params=root / "params.yaml", models=cmd[2:], metric="fid_over_floor", margin=0.0)
        == []
    )
    out = capsys.readouterr().out
    assert f"genpipe-diffusion: champion is v{v2} -> reports/promote.json" in out
    assert out.count("(unchanged, nothing new to record)") == len(names) - 1

    promote.rollback_main(params=root / "params.yaml", model="diffusion_pixel")
    assert f"champion v{v2} -> v1; v{v2} is retired" in capsys.readouterr().out
    assert version_by_alias(tracking_uri=uri, name="genpipe-diffusion", alias=CHAMPION) == "1"

    out = run(cmd, root).stdout  # the next `dvc repro`: the stage's own command runs again and exits 0
    assert f"v{v2} was rolled back" in out and "never promoted again" in out
    assert version_by_alias(tracking_uri=uri, name="genpipe-diffusion", alias=CHAMPION) == "1"
    decisions = history(uri, "genpipe-diffusion")
    assert [(e["n"], e["decision"]) for e in decisions] == [(1, "promoted"), (2, "rolled_back")]
    assert (decisions[1]["from"], decisions[1]["to"]) == (v2, "1") and decisions[1]["user"]
    entry = json.loads((root / "reports" / "promote.json").read_text())["genpipe-diffusion"]
    assert (entry["decision"], entry["from"], entry["to"]) == ("rolled_back", v2, "1")

    lines = promote.lineage(
        params=root / "params.yaml", target="diffusion_pixel@history"
    )  # `genpipe models --lineage diffusion_pixel@history`
    at = lines.index("decisions of genpipe-diffusion (tags decision.<n>):")
    assert "1: " in lines[at + 1] and f"promoted challenger v{v2} against v1" in lines[at + 1]
    assert f"rolled back v{v2} -> v1" in lines[at + 2] and len(lines) == at + 3


def test_every_named_model_is_decided_and_failures_are_named(workspace):
    root, uri = workspace
    add_evaluated(uri, root, name="genpipe-vae", fid_over_floor=2.0)
    w1 = add_evaluated(uri, root, name="genpipe-gan", fid_over_floor=2.0)
    set_alias(tracking_uri=uri, name="genpipe-gan", alias=CHAMPION, version=w1)
    add_evaluated(uri, root, name="genpipe-gan", fid_over_floor=1.0, evaluator="f" * 64)
    add_evaluated(uri, root, name="genpipe-wgan", fid_over_floor=2.0)
    proc = run(["genpipe", "promote", "gan", "gann", "vae", "wgan"], root, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "2 of 4 models not decided" in proc.stderr and "gan: " in proc.stderr and "gann" in proc.stderr
    assert "different evaluators" in proc.stderr and "unknown model 'gann'" in proc.stderr
    for name in ("genpipe-vae", "genpipe-wgan"):  # decided although earlier ones failed
        assert version_by_alias(tracking_uri=uri, name=name, alias=CHAMPION) == "1"
    assert version_by_alias(tracking_uri=uri, name="genpipe-gan", alias=CHAMPION) == w1


def test_lock_settings_and_a_held_lock(workspace, monkeypatch):
    root, uri = workspace
    for value in ("abc", "-1", "nan", "inf"):
        monkeypatch.setenv(promote.BREAK_AFTER_ENV, value)
        with pytest.raises(
            ValueError, match=rf"GENPIPE_LOCK_BREAK_AFTER must be a number of seconds >= 0.*{value}"
        ):
            promote.lock_settings()
    with pytest.raises(
        ValueError, match="GENPIPE_LOCK_BREAK_AFTER"
    ):  # once for the command, before any model
        promote.main_many(
            params=root / "params.yaml", models=["vae", "gan"], metric="fid_over_floor", margin=0.0
        )
    monkeypatch.setenv(promote.WAIT_ENV, "soon")
    monkeypatch.setenv(promote.BREAK_AFTER_ENV, "30")
    with pytest.raises(ValueError, match="GENPIPE_LOCK_WAIT must be a number of seconds >= 0, got 'soon'"):
        promote.lock_settings()
    monkeypatch.setenv(promote.WAIT_ENV, "2.5")
    assert promote.lock_settings() == {"timeout": 2.5, "break_after": 30.0}
    add_evaluated(uri, root, fid_over_floor=2.0)
    with registry_lock(uri, "genpipe-diffusion"):  # this process holds it: the CLI waits, then says who
        proc = run(["genpipe", "promote", "diffusion_pixel"], root, check=False, GENPIPE_LOCK_WAIT="0.5")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "still held after waiting 0.5 s" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert not (root / "reports" / "promote.json").exists()  # nothing decided outside the lock
    assert version_by_alias(tracking_uri=uri, name="genpipe-diffusion", alias=CHAMPION) is None


def test_git_commit_is_dirty_only_for_code_and_params(tmp_path: Path, monkeypatch):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True)

    files = {
        "components/a.py": "x = 1\n",
        "pipelines/b.py": "y = 2\n",
        "params.yaml": "a: 1\n",
        "dvc.lock": "stages: {}\n",
        "reports/promote.json": "{}\n",
        ".gitignore": "__pycache__/\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    sha = git_commit()
    assert len(sha) == 40
    # What the stages themselves write (tracked outputs, untracked reports) is not the code.
    (tmp_path / "dvc.lock").write_text("stages: {prepare: {}}\n")
    (tmp_path / "reports" / "promote.json").write_text('{"x": 1}\n')
    (tmp_path / "reports" / "new.json").write_text("{}\n")
    (tmp_path / "components" / "__pycache__").mkdir()
    (tmp_path / "components" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert git_commit() == sha
    for rel, text in (("params.yaml", "a: 2\n"), ("components/a.py", "x = 3\n"), ("pipelines/new.py", "")):
        original = (tmp_path / rel).read_text() if (tmp_path / rel).exists() else None
        (tmp_path / rel).write_text(text)
        assert git_commit() == f"{sha}-dirty", rel
        if original is None:
            (tmp_path / rel).unlink()
        else:
            (tmp_path / rel).write_text(original)
        assert git_commit() == sha, rel
