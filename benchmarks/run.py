"""`make bench`: throughput of training through Ray Train + Ray Data against a plain PyTorch loop.

Both sides train the same evaluator model on the same prepared digits with the same batch, one
torch thread, measured in the same run; the figure that matters is the ratio (Ray / plain). The
plain loop runs in a fresh process twice: with glibc's default malloc (what a user's own script
gets) and with the malloc settings the Ray adapter gives its workers (like for like: what Ray
itself adds). Results are printed as a Markdown table and written to reports/bench.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from components.data.config import PrepareConfig
from components.evaluation.evaluator import EvaluatorConfig, EvaluatorTask
from components.training.config import LoopConfig, TrainConfig

STEPS = WARMUP = 300  # each side measures STEPS steps after WARMUP steps (kernel and allocator warm-up)
REPEATS = 2
MODELS = {
    "evaluator (default, 0.30M)": EvaluatorConfig(),
    "wide evaluator (1.18M)": EvaluatorConfig(widths=(64, 128, 256)),
}


def plain_steps_per_s(cfg: EvaluatorConfig, data: Path, *, batch: int) -> float:
    """A hand-written PyTorch loop over in-memory shuffled batches: the family's loss, backward, step.

    It runs the same task step (augmentation, loss) as the spine, so the ratio isolates what the
    spine and Ray add: data iteration, guards, metric windows, scheduling.
    """
    from components.data.readers import ShardDataset

    ds = ShardDataset(data, "train")
    loop = LoopConfig(steps=STEPS, batch_size=batch, lr=1e-3, grad_clip=None, schedule="constant")
    task = EvaluatorTask(cfg, loop, in_channels=ds.meta["channels"], num_classes=ds.meta["num_classes"])
    task.build(device=torch.device("cpu"), wrap=lambda m: m)
    opt = task.optimizers()["main"]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ds.images, ds.labels), batch_size=batch, shuffle=True, drop_last=True
    )

    def batches():
        while True:
            for x, y in loader:
                yield {"image": x, "label": y}

    it = batches()
    tic = 0.0
    for step in range(STEPS + WARMUP):
        if step == WARMUP:
            tic = time.perf_counter()
        loss, _ = task.step("main", next(it), step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return STEPS / (time.perf_counter() - tic)


def plain_in_subprocess(name: str, data: Path, *, batch: int, worker_malloc: bool) -> float:
    """`plain_steps_per_s` in a fresh process: glibc reads its malloc variables at process start."""
    from components.training.ray_adapter import WORKER_MALLOC_ENV, worker_env

    env = {k: v for k, v in os.environ.items() if k not in WORKER_MALLOC_ENV}
    if worker_malloc:
        env.update(worker_env())
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--plain", name, str(data), str(batch)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[-1])


def ray_steps_per_s(cfg: EvaluatorConfig, data: Path, *, batch: int, storage: Path) -> tuple[float, float]:
    """The genpipe loop as one Ray Train worker on materialized Ray Data; (steps/s, wall seconds)."""
    from functools import partial

    from components.data.raydata import ray_dataset
    from components.data.shards import read_meta
    from components.training.ray_adapter import fit

    meta = read_meta(data)
    # The last log window is the STEPS steps after WARMUP: the rate the plain side measures.
    loop = LoopConfig(
        steps=WARMUP + STEPS, batch_size=batch, lr=1e-3, log_every=STEPS, grad_clip=None, schedule="constant"
    )
    train = TrainConfig(storage_path=str(storage))
    tic = time.perf_counter()
    result = fit(
        task_factory=partial(
            EvaluatorTask, cfg, loop, in_channels=meta["channels"], num_classes=meta["num_classes"]
        ),
        loop=loop,
        train=train,
        run_name=f"bench-{time.time_ns()}",
        datasets={"train": ray_dataset(data, "train")},
    )
    return result.metrics["perf/steps_per_s"], time.perf_counter() - tic


def main() -> None:
    import ray

    from components.data.build import build_dataset

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="genpipe-bench-") as tmp:
        data = Path(tmp) / "processed"
        build_dataset(PrepareConfig(), data, log=lambda *_: None)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        rows = []
        batch = 64
        for name, cfg in MODELS.items():
            # Interleaved repeats, best of each: a shared 2-core machine is noisy; the best run is
            # the one least disturbed by anything else.
            plain = plain_same = on_ray = wall = 0.0
            for _ in range(REPEATS):
                plain = max(plain, plain_in_subprocess(name, data, batch=batch, worker_malloc=False))
                plain_same = max(plain_same, plain_in_subprocess(name, data, batch=batch, worker_malloc=True))
                speed, seconds = ray_steps_per_s(cfg, data, batch=batch, storage=Path(tmp) / "ray")
                on_ray, wall = max(on_ray, speed), seconds
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "plain_steps_per_s": plain,
                    "plain_worker_malloc_steps_per_s": plain_same,
                    "ray_steps_per_s": on_ray,
                    "ratio": on_ray / plain,
                    "ratio_same_malloc": on_ray / plain_same,
                    "ray_fit_wall_s": wall,
                }
            )
        ray.shutdown()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1; "
        f"ray.init {ray_start:.1f} s\n"
    )
    print(
        "| model | batch | plain loop steps/s | plain loop, worker malloc steps/s "
        "| Ray Train + Ray Data steps/s | ratio | ratio, same malloc | fit() wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['plain_steps_per_s']:.1f} "
            f"| {r['plain_worker_malloc_steps_per_s']:.1f} | {r['ray_steps_per_s']:.1f} "
            f"| {r['ratio']:.3f} | {r['ratio_same_malloc']:.3f} | {r['ray_fit_wall_s']:.1f} |"
        )
    out = Path("reports/bench.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"ray_init_s": ray_start, "rows": rows}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plain"]:  # one plain measurement, run by plain_in_subprocess
        model, folder, size = sys.argv[2:5]
        torch.set_num_threads(1)
        print(plain_steps_per_s(MODELS[model], Path(folder), batch=int(size)))
    else:
        main()
