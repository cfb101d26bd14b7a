"""`make bench`: throughput of training through Ray Train + Ray Data against a plain PyTorch loop.

Both sides train the same task on the same prepared digits with the same batch, one torch thread,
measured in the same run; the figure that matters is the ratio (Ray / plain). The plain loop runs
in a fresh process twice: with glibc's default malloc (what a user's own script gets) and with the
malloc settings the Ray adapter gives its workers (like for like: what Ray itself adds). A row of
`MODELS` is any task factory (evaluator, diffusion UNet, ...) with its batch and step count.
Results are printed as a Markdown table and written to reports/bench.json (rows merged by name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from components.data.config import PrepareConfig
from components.evaluation.evaluator import EvaluatorConfig, EvaluatorTask
from components.training.config import LoopConfig, TrainConfig
from components.training.task import Task

STEPS = 300  # each side measures STEPS steps after as many warm-up steps (kernel and allocator warm-up)
REPEATS = 2
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the diffusion row's model

#: (data meta, loop) -> a picklable zero-argument task factory (a partial of a component class:
#: Ray workers import it by reference, and this package is not installed).
TaskFactory = Callable[[dict, LoopConfig], Callable[[], Task]]


@dataclass(frozen=True)
class Bench:
    """One row: the task, its global batch and how many steps each side warms up and then times."""

    factory: TaskFactory
    batch: int = 64
    steps: int = STEPS


def evaluator_task(cfg: EvaluatorConfig) -> TaskFactory:
    def factory(meta: dict, loop: LoopConfig) -> Callable[[], Task]:
        return partial(
            EvaluatorTask, cfg, loop, in_channels=meta["channels"], num_classes=meta["num_classes"]
        )

    return factory


def diffusion_task(variant: str = "pixel") -> TaskFactory:
    """The params.yaml train_diffusion model (backbone sizes from the data), lazily: no file read at import."""

    def factory(meta: dict, loop: LoopConfig) -> Callable[[], Task]:
        from components.config import load_stage
        from components.diffusion.sizing import resolve_backbone
        from components.diffusion.task import DiffusionTask

        cfg = getattr(load_stage(PARAMS, "train_diffusion")["train_diffusion"], variant)
        size = meta["image_size"]
        model = resolve_backbone(
            cfg, variant=variant, channels=meta["channels"], num_classes=meta["num_classes"], size=size
        )
        return partial(
            DiffusionTask,
            model,
            loop,
            sampling=cfg.sampling,
            num_classes=meta["num_classes"],
            image_shape=(meta["channels"], size, size),
        )

    return factory


MODELS: dict[str, Bench] = {
    "evaluator (default, 0.30M)": Bench(evaluator_task(EvaluatorConfig())),
    "wide evaluator (1.18M)": Bench(evaluator_task(EvaluatorConfig(widths=(64, 128, 256)))),
    # params.yaml's pixel UNet at its own batch; a step costs ~20x an evaluator step on one thread
    "diffusion UNet (train_diffusion.pixel)": Bench(diffusion_task("pixel"), batch=128, steps=20),
}


def bench_loop(bench: Bench) -> LoopConfig:
    """The loop both sides run: warm-up plus timed steps, constant LR, no clipping, no EMA."""
    return LoopConfig(
        steps=2 * bench.steps,
        batch_size=bench.batch,
        lr=1e-3,
        log_every=bench.steps,  # the last log window is the timed steps: the rate the plain side measures
        grad_clip=None,
        schedule="constant",
    )


def plain_steps_per_s(bench: Bench, data: Path) -> float:
    """A hand-written PyTorch loop over in-memory shuffled batches: the task's own step, backward, step.

    It runs the same task step (augmentation, loss) as the spine, so the ratio isolates what the
    spine and Ray add: data iteration, guards, metric windows, scheduling.
    """
    from components.data.readers import ShardDataset

    ds = ShardDataset(data, "train")
    task = bench.factory(ds.meta, bench_loop(bench))()
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    optimizers = task.optimizers()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ds.images, ds.labels),
        batch_size=bench.batch,
        shuffle=True,
        drop_last=True,
    )

    def batches():
        while True:
            for x, y in loader:
                yield {"image": x, "label": y}

    it = batches()
    tic = 0.0
    for step in range(2 * bench.steps):
        if step == bench.steps:
            tic = time.perf_counter()
        batch = next(it)
        for phase in task.phases:
            opt = optimizers[phase.optimizer]
            loss, _ = task.step(phase.name, batch, step=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return bench.steps / (time.perf_counter() - tic)


def plain_in_subprocess(name: str, data: Path, *, worker_malloc: bool) -> float:
    """`plain_steps_per_s` in a fresh process: glibc reads its malloc variables at process start."""
    from components.training.ray_adapter import WORKER_MALLOC_ENV, worker_env

    env = {k: v for k, v in os.environ.items() if k not in WORKER_MALLOC_ENV}
    if worker_malloc:
        env.update(worker_env())
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--plain", name, str(data)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return float(out.stdout.split()[-1])


def ray_steps_per_s(bench: Bench, data: Path, *, storage: Path) -> tuple[float, float]:
    """The genpipe loop as one Ray Train worker on materialized Ray Data; (steps/s, wall seconds)."""
    from components.data.raydata import ray_dataset
    from components.data.shards import read_meta
    from components.training.ray_adapter import fit

    loop = bench_loop(bench)
    tic = time.perf_counter()
    result = fit(
        task_factory=bench.factory(read_meta(data), loop),
        loop=loop,
        train=TrainConfig(storage_path=str(storage)),
        run_name=f"bench-{time.time_ns()}",
        datasets={"train": ray_dataset(data, "train")},
    )
    return result.metrics["perf/steps_per_s"], time.perf_counter() - tic


def measure(name: str, data: Path, *, storage: Path, repeats: int = REPEATS) -> dict:
    """One row; interleaved repeats, best of each (the run least disturbed on a shared machine)."""
    bench = MODELS[name]
    plain = plain_same = on_ray = wall = 0.0
    for _ in range(repeats):
        plain = max(plain, plain_in_subprocess(name, data, worker_malloc=False))
        plain_same = max(plain_same, plain_in_subprocess(name, data, worker_malloc=True))
        speed, seconds = ray_steps_per_s(bench, data, storage=storage)
        on_ray, wall = max(on_ray, speed), seconds
    return {
        "model": name,
        "batch": bench.batch,
        "timed_steps": bench.steps,
        "plain_steps_per_s": plain,
        "plain_worker_malloc_steps_per_s": plain_same,
        "ray_steps_per_s": on_ray,
        "plain_images_per_s": plain * bench.batch,
        "ray_images_per_s": on_ray * bench.batch,
        "ratio": on_ray / plain,
        "ratio_same_malloc": on_ray / plain_same,
        "ray_fit_wall_s": wall,
    }


def run(names: list[str], *, repeats: int = REPEATS) -> tuple[list[dict], float]:
    """Rows for `names` on freshly prepared digits in one local Ray instance; (rows, ray.init seconds)."""
    import ray
    from ray.data import DataContext

    from components.data.build import build_dataset

    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown bench model {unknown[0]!r}; valid: {', '.join(MODELS)}")
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="genpipe-bench-") as tmp:
        data = Path(tmp) / "processed"
        build_dataset(PrepareConfig(), data, log=lambda *_: None)
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        DataContext.get_current().enable_progress_bars = False
        try:
            rows = [measure(name, data, storage=Path(tmp) / "ray", repeats=repeats) for name in names]
        finally:
            ray.shutdown()
    return rows, ray_start


def table(rows: list[dict]) -> str:
    """The Markdown table of BENCHMARKS.md."""
    lines = [
        "| model | batch | plain loop steps/s | plain loop, worker malloc steps/s "
        "| Ray Train + Ray Data steps/s | plain images/s | Ray images/s | ratio | ratio, same malloc "
        "| fit() wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['plain_steps_per_s']:.2f} "
            f"| {r['plain_worker_malloc_steps_per_s']:.2f} | {r['ray_steps_per_s']:.2f} "
            f"| {r['plain_images_per_s']:.0f} | {r['ray_images_per_s']:.0f} "
            f"| {r['ratio']:.3f} | {r['ratio_same_malloc']:.3f} | {r['ray_fit_wall_s']:.1f} |"
        )
    return "\n".join(lines)


def write(rows: list[dict], *, ray_start: float, out: Path) -> None:
    """Merge `rows` into `out` by model name (a run of some rows keeps the others)."""
    old = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    fresh = {r["model"] for r in rows}
    merged = [r for r in old if r["model"] not in fresh] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ray_init_s": ray_start, "rows": merged}, indent=2))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME", help="rows to run")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", type=Path, default=Path("reports/bench.json"))
    args = parser.parse_args(argv)
    rows, ray_start = run(args.models, repeats=args.repeats)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1; "
        f"ray.init {ray_start:.1f} s\n"
    )
    print(table(rows))
    write(rows, ray_start=ray_start, out=args.out)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plain"]:  # one plain measurement, run by plain_in_subprocess
        model, folder = sys.argv[2:4]
        torch.set_num_threads(1)
        print(plain_steps_per_s(MODELS[model], Path(folder)))
    else:
        main()
