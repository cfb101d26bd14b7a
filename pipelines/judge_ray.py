"""`evaluate.num_workers: N`: the judge's sampling jobs on N Ray actors (FID-50k without one process).

Each actor loads the generator and the evaluator once, from their folders (absolute paths: workers
change directory), on `evaluate.device` (one GPU per actor with `cuda`), and runs `run_job`: it
samples a batch on that batch's own seed and hands back its `BatchScore` (features, accuracy hits,
grid picks), not the images, except for `--dump-samples`. `ActorPool.map` keeps every actor busy and
yields the results in job order, so the driver merges the same batches in the same order as the
in-process judge and the figures agree with it to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from components.config import RayConfig
from components.evaluation.evaluator import load_evaluator
from components.evaluation.judge import Job, JobResult, Runner, run_job, warm_up
from components.generators import load_generator
from pipelines.ray_start import init_ray


class JudgeWorker:
    """A Ray actor: one generator and one evaluator, loaded once, running jobs."""

    def __init__(
        self,
        model_dir: str,
        evaluator_dir: str,
        *,
        device: str,
        threads: int,
        seed: int,
        options: dict,
        accuracy: bool,
        per_row: int,
    ) -> None:
        torch.set_num_threads(threads)
        self.generator = load_generator(Path(model_dir), device=torch.device(device))
        self.evaluator = load_evaluator(evaluator_dir, device=device).float().eval()
        self.kwargs = {"seed": seed, "options": options, "accuracy": accuracy, "per_row": per_row}
        self.warm = False

    def run(self, job: Job, keep_images: bool) -> JobResult:
        if not self.warm:  # before this actor's first timed batch, at that batch's size
            warm_up(self.generator, batch_size=job.stop - job.start, options=self.kwargs["options"])
            self.warm = True
        return run_job(self.generator, self.evaluator, job, keep_images=keep_images, **self.kwargs)


def ray_runner(
    ray_cfg: RayConfig,
    *,
    num_workers: int,
    model_dir: Path,
    evaluator_dir: Path,
    device: str,
    threads: int,
    seed: int,
    options: dict,
    accuracy: bool,
    per_row: int,
) -> Runner:
    """A `judge` runner whose jobs run on `num_workers` actors; the actors end with the set."""
    import ray
    from ray.util import ActorPool

    init_ray(ray_cfg)
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and gpus < 1:  # actors asking for a GPU would wait forever
        raise ValueError("evaluate.device=cuda with evaluate.num_workers, but the Ray cluster has no GPU")
    actor = ray.remote(JudgeWorker).options(
        num_cpus=threads, num_gpus=1 if device == "cuda" else 0, max_restarts=0
    )
    settings = {"device": device, "threads": threads, "seed": seed, "options": options}
    settings.update(accuracy=accuracy, per_row=per_row)

    def runner(jobs: list[Job], keep_images: bool) -> Iterator[JobResult]:
        actors = [
            actor.remote(str(model_dir.resolve()), str(evaluator_dir.resolve()), **settings)
            for _ in range(min(num_workers, len(jobs)))
        ]
        try:
            yield from ActorPool(actors).map(lambda a, job: a.run.remote(job, keep_images), jobs)
        except ray.exceptions.RayTaskError as err:  # the worker's own error, as one line
            cause = getattr(err, "cause", None)
            raise (cause if isinstance(cause, Exception) else RuntimeError(_last_line(err))) from None
        except ray.exceptions.RayActorError as err:  # e.g. a model folder the worker could not load
            raise RuntimeError(f"a judge worker died: {_last_line(err)}") from None
        finally:
            for a in actors:
                ray.kill(a)

    return runner


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
