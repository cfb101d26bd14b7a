"""Ray Train's private hooks, in one module: each trim is gated on the Ray it was written for.

A `TorchTrainer.fit()` in Ray 2.60 starts helper actors that cost a process start each (~2-3 s on
2 cores) and do nothing for a stage whose splits travel as arrays on an instance that dies with the
command. Removing them needs Ray Train internals, so every such hook lives here, and:
- runs only on `TESTED_RAY` (the version it was written and tested for); on any other Ray, stock
  Ray Train runs and one notice says so;
- has a name, and `GENPIPE_RAY_TRIMS_OFF=name,name` (or `all`) turns it off;
- has a test of its effect (tests/components/training/test_ray_trims.py: the actor it saves is
  absent with it and present without it), so an upgrade that breaks one fails loudly.

The trims:
- `datasets_callback`: no DatasetsCallback when fit() gets no Ray Datasets (it starts a
  DatasetManager actor that would serve none).
- `placement_group_cleaner`: no detached PlacementGroupCleaner actor where it cannot help: on an
  instance owned by the command (its placement groups die with it), or a cluster without the State
  API it polls (without `ray[default]`'s dashboard it only times out, up to 12 s per fit()).
- `autoscaling_coordinator`: the fixed scaling policy without its resource requests to Ray Data's
  detached AutoscalingCoordinator, on an owned instance with no Ray Dataset (no autoscaler and no
  Ray Data job to inform; the first fit() waited ~3 s for that actor).
- `report_log`: Ray's INFO line per `ray.train.report` (all metrics of a checkpoint in one line)
  is logged under a logger named by its source file, outside the `ray.train` logger.
- `quiet_logs`: Ray's noise on a default run, silenced logger by logger (`QUIET_LOGS`; never a
  blanket redirect), in the driver and, through a worker setup hook, in every Ray worker.
- `paced_scheduler`: Ray Data's scheduling loop (StreamingExecutor) waits PACE_S after a step while
  its consumer has blocks waiting. Stock, a backpressured execution (read-ahead full, finished
  tasks whose output it may not read yet: `ray.wait` returns at once) loops without pause, a busy
  thread in the consuming process, which for a streamed split is the Train worker: at 200k images
  the streamed fit ran at half its 20k rate on 2 cores (BENCHMARKS.md, "Scale"). An idle consumer
  (nothing queued) gets the stock loop.
- `parquet_read_tasks`: Ray Data's read tasks of Parquet capped at `raydata.BLOCK_BYTES` through its
  private `RAY_DATA_PARQUET_BIN_PACKING_BYTES` (128 MiB in 2.60, all in one task's memory: the
  read workers' memory grew with the split; `components/data/raydata.read_parquet`).
- `parquet_footer_actors`: Ray Data's Parquet listing reads the files' footers on one actor per
  `raydata.FOOTERS_PER_ACTOR` files, not 32 actors for any read (its private
  `RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`): each is a worker process, ~45 s of start-ups for a
  three-file split on a cluster of 1-CPU nodes.

Not every hook is about start-up: `paced_scheduler` and `parquet_read_tasks` bound CPU and memory.
Off, or on another Ray, each is stock Ray Data (correct, with a busier scheduling thread, more
memory per read task, or 32 footer readers per read).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from typing import Any

import ray

TESTED_RAY = "2.60."  # the Ray release line every trim below was written and tested for
OFF_ENV = "GENPIPE_RAY_TRIMS_OFF"  # comma-separated trim names, or `all`
TRIMS = (
    "datasets_callback",
    "placement_group_cleaner",
    "autoscaling_coordinator",
    "report_log",
    "quiet_logs",
    "paced_scheduler",
    "parquet_read_tasks",
    "parquet_footer_actors",
)
PACE_S = 0.02  # the scheduling loop's pause while its consumer has blocks (ray.wait's timeout: 0.1 s)

log = logging.getLogger("genpipe")
_noticed: list[str] = []


def enabled(name: str) -> bool:
    """Whether trim `name` applies: the tested Ray runs and `GENPIPE_RAY_TRIMS_OFF` does not name it."""
    if name not in TRIMS:
        raise ValueError(f"unknown Ray trim {name!r}; valid: {', '.join(TRIMS)}")
    off = {s.strip() for s in os.environ.get(OFF_ENV, "").split(",") if s.strip()}
    unknown = off - set(TRIMS) - {"all"}
    if unknown:
        raise ValueError(
            f"{OFF_ENV}={os.environ[OFF_ENV]!r}: unknown trim {sorted(unknown)[0]!r}; "
            f"valid: all, {', '.join(TRIMS)}"
        )
    if "all" in off or name in off:
        return False
    if not ray.__version__.startswith(TESTED_RAY):
        if not _noticed:
            _noticed.append(ray.__version__)
            log.warning(
                "genpipe: Ray %s is not the %sx its start-up trims were written for; running stock "
                "Ray Train (a few seconds more per training stage)",
                ray.__version__,
                TESTED_RAY,
            )
        return False
    return True


#: {Ray-internal logger: (level it is raised to, or None; message starts dropped)}
QUIET_LOGS = {
    # The Train PlacementGroupCleaner asks the State API every ~1 s whether the controller lives; a
    # `ray` install without `ray[default]` runs the dashboard in minimal mode, which refuses, so each
    # poll logs this. Its other warnings (a dead controller's placement group removed) stay.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        None,
        ("Failed to query Ray Train Controller actor state",),
    ),
    # one INFO line per executed dataset, and the notice that progress bars are off (we turn them off)
    "ray.data._internal.execution.streaming_executor": (logging.WARNING, ()),
    "ray.data._internal.progress": (None, ("Progress bars disabled",)),
    # the notice that a new local instance uses token auth (it does, and stays so), and on a machine's
    # first run the note that it wrote ~/.ray/auth_token (docs/troubleshooting.md says so)
    "ray._private.authentication.authentication_token_setup": (
        None,
        ("Token authentication is enabled", "Generated new authentication token"),
    ),
}


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_logs() -> None:
    """Apply QUIET_LOGS in this process (idempotent: one filter per logger)."""
    if not enabled("quiet_logs"):
        return
    for name, (level, messages) in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if level is not None:
            logger.setLevel(level)
        if messages and not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*messages))


def paced_scheduler() -> None:
    """Ray Data's scheduling loop pauses PACE_S after each step while its consumer has blocks
    waiting, in this process (idempotent). Called in the driver, each Train worker and every
    worker's setup hook: the loop runs where a Dataset is consumed (a Train worker, a split
    coordinator, the driver)."""
    if not enabled("paced_scheduler"):
        return
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return
    step = StreamingExecutor._scheduling_loop_step
    if getattr(step, "genpipe_paced", False):
        return

    @functools.wraps(step)
    def paced_step(self, topology) -> bool:
        go_on = step(self, topology)
        if go_on and not self._shutdown and not self._consumer_idling():
            time.sleep(PACE_S)  # the consumer has work: no hurry to re-check a full read-ahead
        return go_on

    paced_step.genpipe_paced = True
    StreamingExecutor._scheduling_loop_step = paced_step


def has_state_api() -> bool:
    """Whether the connected cluster serves the State API (its head runs `ray[default]`'s dashboard)."""
    if not enabled("placement_group_cleaner"):
        return True  # stock behaviour: the cleaner stays either way
    try:
        from ray._private.worker import get_dashboard_url
    except ImportError:
        return True
    return bool(get_dashboard_url())


def quiet_report_log() -> None:
    """Ray's per-report INFO line off (called in each Train worker)."""
    if not enabled("report_log"):
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def trainer(train_fn, *, owned_instance: bool, **kwargs: Any) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer with every applicable trim; stock `TorchTrainer` when none applies."""
    import ray.train.torch

    datasets = bool(kwargs.get("datasets"))
    drop = set()
    if not datasets and enabled("datasets_callback"):
        drop.add("DatasetsCallback")
    if enabled("placement_group_cleaner") and (owned_instance or not has_state_api()):
        drop.add("PlacementGroupCleanerCallback")
    no_coordinator = owned_instance and not datasets and enabled("autoscaling_coordinator")
    if not drop and not no_coordinator:
        return ray.train.torch.TorchTrainer(train_fn, **kwargs)
    return _trimmed_class()(train_fn, drop=frozenset(drop), no_coordinator=no_coordinator, **kwargs)


@functools.cache
def _trimmed_class() -> type:
    """The TorchTrainer subclass, built once on first use (it imports Train internals)."""
    import ray.train.torch
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    callbacks = {
        "DatasetsCallback": DatasetsCallback,
        "PlacementGroupCleanerCallback": PlacementGroupCleanerCallback,
    }

    class NoCoordinatorPolicy(FixedScalingPolicy):
        """FixedScalingPolicy without its resource requests to the AutoscalingCoordinator."""

        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    class TrimmedTrainer(ray.train.torch.TorchTrainer):
        def __init__(self, *args, drop: frozenset[str], no_coordinator: bool, **kwargs) -> None:
            self._drop = tuple(callbacks[name] for name in drop)
            self._no_coordinator = no_coordinator
            super().__init__(*args, **kwargs)

        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, self._drop)]

        def _initialize_and_run_controller(self, **kwargs):
            if self._no_coordinator and type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = NoCoordinatorPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return TrimmedTrainer


@contextlib.contextmanager
def parquet_reads(files: int, *, task_bytes: int, footers_per_actor: int):
    """While a `ray.data.read_parquet` of `files` files is planned: read tasks of at most
    `task_bytes` of Parquet (trim `parquet_read_tasks`) and one footer reader per `footers_per_actor`
    files (trim `parquet_footer_actors`), through Ray Data's private environment variables, which it
    reads when the Dataset is made. A variable the user set wins; the others are removed after."""
    knobs = {}
    if enabled("parquet_read_tasks"):
        knobs["RAY_DATA_PARQUET_BIN_PACKING_BYTES"] = max(1, task_bytes)
    if enabled("parquet_footer_actors"):
        # Its module also reads the variable once, at import, as the default of every later read:
        # imported first, it keeps Ray's own default.
        import ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer  # noqa: F401

        knobs["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = min(32, -(-max(1, files) // footers_per_actor))
    knobs = {key: str(value) for key, value in knobs.items() if key not in os.environ}
    os.environ.update(knobs)
    try:
        yield
    finally:
        for key in knobs:
            os.environ.pop(key, None)
