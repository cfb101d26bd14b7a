"""DDP across nodes: a local Ray cluster with a head and two 1-CPU worker nodes."""

from __future__ import annotations

from functools import partial

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from components.training.config import LoopConfig, TrainConfig
from components.training.loop import train
from components.training.ray_adapter import fit

N = 8


@pytest.fixture(scope="module")
def cluster(toy, fast_controller):
    """Head (1 CPU, for Ray Data and the controller) plus two 1-CPU nodes: two 1-CPU workers cannot share one."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(toy)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.mark.slow
def test_ddp_across_two_nodes_matches_one_process(cluster, toy, tmp_path):
    events = tmp_path / "events.jsonl"
    loop = LoopConfig(steps=4, batch_size=N, lr=0.1, schedule="constant", grad_clip=None, log_every=1)
    result = fit(
        task_factory=partial(toy.RegressionTask, faults=toy.Faults(events=str(events))),
        loop=loop,
        train=TrainConfig(num_workers=2, storage_path=str(tmp_path / "ray"), max_failures=0),
        run_name="multinode",
        datasets={"train": ray.data.from_items(toy.ray_rows(toy.make_data(N)))},
    )
    builds = [e for e in toy.read_jsonl(events) if e["event"] == "build"]
    assert sorted(e["rank"] for e in builds) == [0, 1]
    assert len({e["node"] for e in builds}) == 2  # one worker per node: the all-reduce crossed nodes
    assert set(result.nodes) == {e["node"] for e in builds}  # what the stage tags its run with
    reference = toy.RegressionTask()
    train(
        reference,
        loop=loop,
        batches=toy.loader_batches(toy.make_data(N), batch_size=N),
        device=torch.device("cpu"),
        progress=False,
    )
    torch.testing.assert_close(
        result.module_states(ema_module=None)["net"]["weight"],
        reference.modules["net"].weight.detach(),
        atol=1e-6,
        rtol=0,
    )
