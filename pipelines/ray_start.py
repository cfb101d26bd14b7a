"""A stage's Ray: join the cluster RAY_ADDRESS (or `ray.address`) names, else start a local instance
with explicit resources and a quiet console."""

from __future__ import annotations

import logging
import os
import warnings

from components.config import RayConfig


def joins_cluster(cfg: RayConfig) -> str | None:
    """The address of the Ray cluster to join (RAY_ADDRESS, else `ray.address`); None: a local instance."""
    return os.environ.get("RAY_ADDRESS") or cfg.address


SHARED_LOCAL_ENV = "GENPIPE_LOCAL_RAY"  # `genpipe repro` sets it to the address of its own local instance


def joins_local(cfg: RayConfig) -> bool:
    """True when the instance is this machine's own: a new one, or the one `genpipe repro` shares."""
    address = joins_cluster(cfg)
    return address is None or address == os.environ.get(SHARED_LOCAL_ENV)


# A local instance: the Train controller polls its workers every 0.25 s instead of 2 s (fit() returns
# ~2 polls after the last step), and skips the cloud-only preemption watcher and metrics exporter:
# each is a process importing ray for 1-3 s on a small machine. A joined cluster keeps its settings.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def quiet_ray_logs() -> None:
    """Ray's noise off in this process; also each Ray worker's setup hook (`worker_process_setup_hook`)."""
    from components.training import ray_trims

    ray_trims.quiet_logs()  # Ray-internal loggers: named in the one module that may name them
    ray_trims.paced_scheduler()  # Ray Data's scheduling loop: no busy loop while backpressured
    # Ray Data's DatasetManager (a split dataset) passes an option Ray Data itself deprecated
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions.exclude_resources. is deprecated")


QUIET_RUNTIME_ENV = {"worker_process_setup_hook": "pipelines.ray_start.quiet_ray_logs"}
SHIP_CODE_ENV = "GENPIPE_SHIP_CODE"  # 0: the cluster's nodes have this very genpipe installed


def cluster_runtime_env() -> dict[str, object]:
    """The job's runtime env on a joined cluster: this checkout's `components` and `pipelines` ride
    along (Ray's `py_modules`, uploaded once per content hash), so a node that holds only the
    environment, not the code, runs exactly the driver's code (docs/scale-out.md)."""
    if os.environ.get(SHIP_CODE_ENV, "1") == "0":
        return dict(QUIET_RUNTIME_ENV)
    import components
    import pipelines

    return {**QUIET_RUNTIME_ENV, "py_modules": [components, pipelines]}


def init_ray(cfg: RayConfig) -> None:
    """Join RAY_ADDRESS (or `ray.address`), else start a local instance with explicit resources."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else each worker line prints twice
    _quiet_ray_data()
    quiet_ray_logs()
    address = joins_cluster(cfg)
    if address:
        shared = address == os.environ.get(SHARED_LOCAL_ENV)  # `genpipe repro`'s: no "Connecting to" lines
        ray.init(
            address=address,
            log_to_driver=True,
            runtime_env=QUIET_RUNTIME_ENV if shared else cluster_runtime_env(),
            **({"logging_level": logging.WARNING} if shared else {}),
        )
        return
    for key, value in LOCAL_RAY_ENV.items():  # inherited by every process of the instance started here
        os.environ.setdefault(key, value)
    ray.init(
        address="local",  # a new instance: never the one a user's `ray start` left on this machine
        num_cpus=cfg.num_cpus or os.cpu_count(),
        num_gpus=cfg.num_gpus,
        include_dashboard=cfg.include_dashboard,
        log_to_driver=True,
        runtime_env=QUIET_RUNTIME_ENV,
    )


def _quiet_ray_data() -> None:
    """Ray Data's per-dataset progress bars drown the training progress lines; keep the latter."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
