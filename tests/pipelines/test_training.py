"""The shared training-stage driver: argument checks that fail before Ray or MLflow start."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from components.stages import TrainEvaluatorConfig
from components.training.config import LoopConfig, TrainConfig
from pipelines import training
from pipelines.training import check_resources, code_hash, ray_run_name, train_on_ray

REPO = Path(__file__).resolve().parents[2]


def test_unknown_reader_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown reader 'pixels'; valid: images, tokens"):
        train_on_ray(
            stage="train_prior",
            sections={},
            run=None,
            task_factory=None,
            loop=None,
            data_dir=Path("data/tokens"),
            run_name="unused",
            reader="pixels",
        )


@pytest.fixture(scope="module")
def two_cpu_ray():
    """A local Ray of 2 logical CPUs and no GPU (this machine's default instance)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray.cluster_resources()
    if started:
        ray.shutdown()


@pytest.mark.parametrize(
    ("train", "match"),
    [
        (
            dict(use_gpu=True),
            "train.num_workers=1 x train.gpus_per_worker=1 needs 1 GPUs and the Ray cluster has 0",
        ),
        (
            dict(num_workers=3),
            "train.num_workers=3 x train.cpus_per_worker=1 needs 3 CPUs and the Ray cluster has 2",
        ),
        (dict(cpus_per_worker=2.5), "x train.cpus_per_worker=2.5 needs 2.5 CPUs"),
    ],
)
def test_a_local_instance_short_of_resources_fails_fast(two_cpu_ray, train, match):
    # Ray Train would wait for ever for a placement group this instance can never hold.
    if two_cpu_ray.get("CPU") != 2 or two_cpu_ray.get("GPU", 0) != 0:
        pytest.skip(f"another test's Ray instance is running with {two_cpu_ray}")
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        check_resources(TrainConfig(**train), local=True)


def test_what_fits_passes_and_a_joined_cluster_only_notes(two_cpu_ray, capsys):
    check_resources(TrainConfig(num_workers=2), local=True)
    check_resources(TrainConfig(use_gpu=True, num_workers=4), local=False)
    out = capsys.readouterr().out
    assert "needs 4 CPUs" in out and "needs 4 GPUs" in out and "autoscaler" in out


def test_the_ray_run_name_follows_params_and_code(monkeypatch):
    # Same params and code resume a killed run; new params or new code (DVC re-runs the stage when
    # its code changes) must start fresh, not hand back the weights the old code trained.
    def sections(steps: int) -> dict:
        loop = LoopConfig(steps=steps, batch_size=8, lr=0.1)
        return {"train_evaluator": TrainEvaluatorConfig(loop=loop), "train": TrainConfig()}

    name = ray_run_name("train_evaluator", sections(10), data_deps=[])
    assert name.startswith("train_evaluator-") and name == ray_run_name(
        "train_evaluator", sections(10), data_deps=[]
    )
    assert ray_run_name("train_evaluator", sections(11), data_deps=[]) != name
    monkeypatch.setattr(training, "code_hash", lambda: "0" * 64)
    assert ray_run_name("train_evaluator", sections(10), data_deps=[]) != name


def test_the_code_hash_follows_every_source_file_and_only_sources(tmp_path):
    packages = tuple(shutil.copytree(REPO / name, tmp_path / name) for name in ("components", "pipelines"))
    first = code_hash(packages)
    assert code_hash() == first  # the copy hashes as the running packages do
    (packages[1] / "notes.txt").write_text("not code")
    shutil.rmtree(packages[0] / "__pycache__", ignore_errors=True)
    assert code_hash(packages) == first
    loop = packages[0] / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\n# a comment is a change\n")
    edited = code_hash(packages)
    assert edited != first
    loop.rename(loop.with_name("loop2.py"))  # same bytes, another name
    assert code_hash(packages) not in (first, edited)
