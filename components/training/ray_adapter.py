"""The training loop as a Ray Train (V2) worker: sharded Ray Data, DDP, checkpoints in Ray storage.

The only module outside components/data that imports Ray (STYLE 2: Ray's own example marks its four
Ray lines). Each worker runs `loop.train` on its shard; rank 0 writes per-step metrics through the
sink; every rank calls `ray.train.report` only at checkpoints, because report is a barrier that
waits for the controller to poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). A run is
named by the caller: fitting again with the same name and storage path resumes from the latest
checkpoint that run reported, after a worker failure and after a killed driver alike.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn

from components.data import streaming
from components.data.readers import epoch_batches
from components.storage import ray_storage
from components.training import distributed as dist
from components.training import ray_trims
from components.training.checkpoint import State, load_state, module_states, save_state
from components.training.config import LoopConfig, TrainConfig
from components.training.loop import NonFiniteError, train
from components.training.reporting import MetricSink, SampleSink
from components.training.task import Batch, Task

DATASET_KEYS = ("train", "val")
Columns = dict[str, np.ndarray]  # a small split's rows: equal-length arrays, one row per leading index

# glibc malloc in a Train worker: measured on the default evaluator, every step's activation-sized
# blocks were mmapped and unmapped anew (~3,700 minor page faults per step, a fifth of the worker's
# CPU in the kernel, 0.73x the speed of the same loop in a plain process). A fixed mmap threshold
# keeps blocks under 32 MiB in the heap and a 1 GiB trim threshold keeps freed heap for the next
# step: no faults after the first steps, the same speed as a plain process. PyTorch's CPU tuning
# guides make the same point with jemalloc/tcmalloc; these two variables need no extra library.
# A value already set in the driver's environment wins.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2), "MALLOC_TRIM_THRESHOLD_": str(1024**3)}


@dataclass(frozen=True)
class FitResult:
    """What a finished run leaves: its final metrics and the checkpoint that holds its state."""

    metrics: dict[str, float]  # the final metrics (train window averages, lr, val/*)
    checkpoint: ray.train.Checkpoint | None  # the latest reported checkpoint (the final state)
    path: str  # the run folder in storage
    resumed_from: int | None  # step the last attempt restored from, None when it started fresh
    clock: dict[str, float] = field(default_factory=dict)  # rank 0's first_step / last_step (time.time())
    nodes: tuple[str, ...] = ()  # the Ray node id each rank ran on, in rank order
    data: str = ""  # how the workers got their rows: one of streaming.MODES

    def state(self) -> State:
        """The final training state (modules, EMA, optimizers, ...) read from the checkpoint."""
        if self.checkpoint is None:
            raise FileNotFoundError(f"run {self.path} reported no checkpoint")
        with self.checkpoint.as_directory() as folder:
            return load_state(folder)

    def module_states(self, *, ema_module: str | None, use_ema: bool = True) -> dict[str, Any]:
        """Final module state dicts for export, with EMA weights in `ema_module` when kept."""
        return module_states(self.state(), ema_module=ema_module, use_ema=use_ema)

    def load_module(self, name: str, module: nn.Module, *, ema_module: str | None) -> nn.Module:
        """`module` with the final weights of the task's module `name` (EMA where kept), in eval mode."""
        module.load_state_dict(self.module_states(ema_module=ema_module)[name])
        return module.eval()


class WorkerFailedError(RuntimeError):
    """Training failed on a worker after `train.max_failures` restarts (the worker's own traceback
    went to the console through Ray's log forwarding; this is the driver's one line)."""


def _failure_line(err: ray.train.WorkerGroupError) -> str:
    """`worker rank 1 (of 2 failing) failed: ValueError: ...`: the first failing rank's error, first line."""
    failures = err.worker_failures
    if not failures:
        return str(err).strip().splitlines()[-1]
    rank = min(failures)
    exc = failures[rank]
    message = next(iter(str(exc).strip().splitlines()), "")
    others = f" (of {len(failures)} failing)" if len(failures) > 1 else ""
    return f"worker rank {rank}{others} failed: {type(exc).__name__}: {message}"


@dataclass(frozen=True)
class _Spec:
    """What each worker receives (pickled): factories, not objects, so each builds its own."""

    task_factory: Callable[[], Task]
    loop: LoopConfig
    train: TrainConfig
    sink_factory: Callable[[], MetricSink] | None
    sample_sink_factory: Callable[[], SampleSink] | None
    shuffle_buffer: int | None
    has_val: bool
    mode: str  # streaming.MODES: arrays from the driver, a cached shard, or a streamed shard
    # Small splits, put in the object store by the driver ({split: ObjectRef of {column: array}}):
    # Train gets no `datasets` (ray_trims saves the actors that serve them); each rank takes its share.
    in_memory: dict[str, Any] | None = None


def check_read_cpus(datasets: dict[str, ray.data.Dataset], train: TrainConfig) -> None:
    """Fail with one line where a lazy split's reads could never run: the Train workers hold every CPU.

    A lazy (streamed) split is read and decoded by Ray Data tasks of one CPU each, scheduled beside
    the Train workers. Ray 2.60's Train V2 reserves nothing for them (DataConfig's exclude_resources
    only shrinks Ray Data's own budget; it frees no CPU), so with every CPU held by a worker the reads
    wait for ever and the fit hangs in the split coordinator. A cluster still short of the workers'
    CPUs is left alone: check_resources (pipelines/training.py) covers it, and an autoscaler may add
    nodes for the pending reads too.
    """
    lazy = streaming.lazy_splits(datasets)
    if not lazy:
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    held = train.num_workers * train.cpus_per_worker
    if total < held or total - held >= 1:
        return
    nodes = sorted(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive"))
    sizes = ", ".join(f"{c:g}" for c in nodes if c > 0)
    raise ValueError(
        f"train.num_workers={train.num_workers} x train.cpus_per_worker={train.cpus_per_worker:g} "
        f"hold {held:g} of the cluster's {total:g} CPUs (nodes of {sizes} CPUs) and the streamed "
        f"split{'s' if len(lazy) > 1 else ''} {', '.join(lazy)} need{'' if len(lazy) > 1 else 's'} "
        "a free CPU for Ray Data's read tasks: lower train.num_workers or train.cpus_per_worker, "
        "or give the nodes more CPUs"
    )


def storage_uri(path: str) -> str:
    """Ray storage path: a URI (s3://...) as given, a local path expanded and made absolute."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def worker_env() -> dict[str, str]:
    """Environment variables of every Train worker process (read by glibc at process start)."""
    return {k: os.environ.get(k, v) for k, v in WORKER_MALLOC_ENV.items()}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 autocast on a GPU, fp32 elsewhere; bf16/fp32 as given."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def fit(
    *,
    task_factory: Callable[[], Task],
    loop: LoopConfig,
    train: TrainConfig,
    run_name: str,
    datasets: dict[str, ray.data.Dataset | Columns],
    sink_factory: Callable[[], MetricSink] | None = None,
    sample_sink_factory: Callable[[], SampleSink] | None = None,
    shuffle_buffer: int | None = 1024,
    owned_instance: bool = False,
) -> FitResult:
    """Train on Ray Train with `train.num_workers` workers; resumes run `run_name` if it has a checkpoint.

    Factories must be picklable (module-level callables or functools.partial); `sink_factory` and
    `sample_sink_factory` are called on rank 0 only. `shuffle_buffer` rows feed each worker's local
    shuffle (None: data order as read). Raises NonFiniteError without retrying: a resume from the
    last checkpoint would only repeat it; WorkerFailedError when a worker still fails after
    `train.max_failures` restarts. `owned_instance`: the Ray instance dies with this command
    (see ray_trims). A split may be a Ray Dataset or, when small, its rows as numpy columns
    (`Columns`, an empty dict for no rows): if every split is small, none of them goes through
    Ray Data at all.
    """
    unknown = sorted(set(datasets) - set(DATASET_KEYS))
    if unknown or "train" not in datasets:
        raise ValueError(f"datasets keys {sorted(datasets)}: need 'train', may have 'val'; unknown {unknown}")
    loop.per_worker_batch(train.num_workers)  # fail here, not in every worker
    mode = streaming.data_mode(datasets, workers=train.num_workers)
    if mode == "in_memory":
        in_memory = {k: ray.put(streaming.as_columns(ds)) for k, ds in datasets.items()}
    else:  # some split goes through Ray Data: the small ones join it as Datasets
        in_memory = None
        datasets = {k: streaming.as_dataset(ds) if isinstance(ds, dict) else ds for k, ds in datasets.items()}
    spec = _Spec(
        task_factory=task_factory,
        loop=loop,
        train=train,
        sink_factory=sink_factory,
        sample_sink_factory=sample_sink_factory,
        shuffle_buffer=shuffle_buffer,
        has_val="val" in datasets,
        mode=mode,
        in_memory=in_memory,
    )
    if in_memory is not None:
        datasets = {}
    check_read_cpus(datasets, train)
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    trainer = ray_trims.trainer(
        _worker,
        owned_instance=owned_instance,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            **ray_storage(storage_uri(train.storage_path)),  # s3://: with its S3 filesystem
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.num_to_keep),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per checkpoint
            worker_runtime_env={"env_vars": worker_env()},
        ),
        datasets=datasets,
        # One worker reads everything: no split, so no SplitCoordinator actor to start (~2 s each).
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[] if train.num_workers == 1 else "all",
            execution_options=streaming.ingest_options(mode),  # a streamed split's bounded read-ahead
        )
        if datasets
        else None,
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as err:  # retries spent: the culprit in one line
        raise WorkerFailedError(_failure_line(err)) from err
    out = result.return_value or {}
    if "nonfinite" in out:
        raise NonFiniteError(out["nonfinite"])
    metrics = out.get("metrics", {k: v for k, v in (result.metrics or {}).items() if k != "step"})
    return FitResult(
        metrics=dict(metrics),
        checkpoint=result.checkpoint,
        path=str(result.path),
        resumed_from=out.get("resumed_from"),
        clock=out.get("clock", {}),
        nodes=tuple(out.get("nodes", ())),
        data=mode,
    )


class RayCheckpointIO:
    """CheckpointIO over Ray Train: restore from get_checkpoint, save through report (all ranks)."""

    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self.restored_step: int | None = None

    def restore(self) -> State | None:
        """This rank's view of the run's latest checkpoint, or None."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = load_state(folder, rank=self.rank)
        self.restored_step = int(state["step"])
        return state

    def save(self, state: State, *, step: int, metrics: dict[str, float]) -> None:
        """Each rank writes its part (rank 0 the shared state, each its RNG); Ray merges the folders."""
        with tempfile.TemporaryDirectory(prefix="genpipe-ckpt-") as folder:
            save_state(folder, state, rank=self.rank)
            # SYNC upload: the files are copied to storage before report returns.
            ray.train.report(
                {**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder)
            )


def _wrapper(*, world: int, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """DDP (via prepare_model, which also moves to the device) for trainable modules when world > 1."""

    def wrap(module: nn.Module) -> nn.Module:
        if world > 1 and any(p.requires_grad for p in module.parameters()):
            return ray.train.torch.prepare_model(module)
        return module.to(device)  # frozen modules (a perceptual net) need no gradient all-reduce

    return wrap


def _data(spec: _Spec, *, micro: int, device: torch.device, rank: int, world: int = 1):
    """batches(epoch) over this worker's train shard and val_batches() over its val shard."""
    if spec.mode == "in_memory":
        share = streaming.rank_share(ray.get(spec.in_memory["train"]), rank=rank, world=world, equal=True)
        batches = epoch_batches(share, batch=micro, seed=spec.train.seed, rank=rank, device=device)
        val = ray.get(spec.in_memory["val"]) if "val" in spec.in_memory else None
        if not val:
            return batches, None
        val = streaming.rank_share(val, rank=rank, world=world, equal=False)
        return batches, streaming.in_memory_val(val, micro=micro, device=device)
    shard = ray.train.get_dataset_shard("train")  # this worker's streaming split: nothing in the driver
    val = ray.train.get_dataset_shard("val") if spec.has_val else None
    kind = streaming.CachedShard if spec.mode == "cached" else streaming.StreamedShard
    extra = {} if spec.mode == "cached" else {"buffer": spec.shuffle_buffer}
    batches = kind(shard, micro=micro, seed=spec.train.seed, rank=rank, device=device, **extra)

    def val_batches() -> Iterable[Batch]:
        return val.iter_torch_batches(batch_size=micro, drop_last=False, device=device)

    return batches, (val_batches if val is not None else None)


def _worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry: build the task and its data on this rank, then run the loop."""
    clock = {"worker": time.time()}  # the stage's timing line: when this process began to work
    spec: _Spec = config["spec"]
    ray_trims.quiet_report_log()
    ray_trims.paced_scheduler()  # a streamed split's scheduling loop runs in this process
    torch.set_num_threads(spec.train.torch_threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    nodes = dist.all_gather_object(ray.get_runtime_context().get_node_id())  # which nodes trained
    device = ray.train.torch.get_device()
    batches, val_batches = _data(
        spec, micro=spec.loop.per_worker_batch(world), device=device, rank=rank, world=world
    )
    io = RayCheckpointIO(rank=rank)
    main = rank == 0
    sink = spec.sink_factory() if main and spec.sink_factory is not None else None
    sample_sink = spec.sample_sink_factory() if main and spec.sample_sink_factory is not None else None
    try:
        metrics = train(
            spec.task_factory(),
            loop=spec.loop,
            batches=batches,
            device=device,
            precision=resolve_precision(spec.train.precision, device),
            seed=spec.train.seed,
            val_batches=val_batches,
            wrap=_wrapper(world=world, device=device),
            checkpoint_io=io,
            sink=sink,
            sample_sink=sample_sink,
            progress=main,
            clock=clock,
        )
    except NonFiniteError as err:
        # Returned, not raised: Ray would retry from the last checkpoint and hit the same NaN.
        return {"nonfinite": str(err), "resumed_from": io.restored_step}
    finally:
        if sink is not None:
            sink.close()
    return {"metrics": metrics, "resumed_from": io.restored_step, "clock": clock, "nodes": nodes}
