"""Schedule endpoints, EMA math and swapping, checkpoint files and RNG round trips, rank helpers."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from components.training import distributed as dist
from components.training.checkpoint import (
    STATE_FILE,
    LocalCheckpointIO,
    load_state,
    module_states,
    rng_state,
    save_state,
    set_rng_state,
)
from components.training.ema import EMA
from components.training.schedule import lr_factor


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_schedule_endpoints_and_monotone_decay(schedule, warmup):
    f = [lr_factor(s, steps=50, warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.1) for s in range(50)]
    assert f[warmup] == 1.0
    assert f[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    assert all(a <= b for a, b in zip(f[:warmup], f[1 : warmup + 1], strict=True))  # warm-up rises
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :], strict=False))  # then never rises
    if warmup:
        assert f[0] == pytest.approx(1 / (warmup + 1))


def test_cosine_midpoint_and_unknown_schedule():
    mid = lr_factor(25, steps=51, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert mid == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule 'step'; valid: constant, cosine, linear"):
        lr_factor(0, steps=10, warmup_steps=0, schedule="step", min_lr_ratio=0.1)


def test_ema_update_math_and_swap():
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.99)
    w0 = net.weight.detach().clone()
    expected = w0.clone()
    for t in range(20):
        with torch.no_grad():
            net.weight.add_(1.0)
        beta = min(0.99, (1 + t) / (10 + t))
        expected = beta * expected + (1 - beta) * net.weight.detach()
        ema.update()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    live = net.weight.detach().clone()
    with ema.swapped():
        torch.testing.assert_close(net.weight, expected)
    assert torch.equal(net.weight, live)
    assert EMA(net, decay=0.5, warmup=False).decay_at(0) == 0.5


def test_ema_state_round_trip_and_mismatch():
    a, b = EMA(nn.Linear(3, 2), decay=0.9), EMA(nn.Linear(3, 2), decay=0.9)
    a.update()
    b.load_state_dict(a.state_dict())
    assert b.updates == 1 and torch.equal(a.shadow["bias"], b.shadow["bias"])
    with pytest.raises(ValueError, match="differing parameters"):
        EMA(nn.Linear(3, 2, bias=False), decay=0.9).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"decay=1.5 must lie in \(0, 1\)"):
        EMA(nn.Linear(1, 1), decay=1.5)


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), np.random.randn()


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    save_state(tmp_path, _state(), rank=0)
    expected = _draws()
    _draws()
    state = load_state(tmp_path)  # weights_only=True inside
    set_rng_state(state["rng"])
    assert _draws() == expected


def _state() -> dict:
    net = nn.Linear(2, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda s: 1.0)
    return {
        "step": 3,
        "epoch": 0,
        "batch": 2,
        "modules": {"net": net.state_dict()},
        "ema": EMA(net, decay=0.9).state_dict(),
        "optimizers": {"main": opt.state_dict()},
        "schedulers": {"main": sched.state_dict()},
        "metrics": {"main/loss": 0.5},
        "rng": rng_state(),
    }


def test_state_files_load_with_weights_only_and_per_rank_rng(tmp_path):
    state = _state()
    save_state(tmp_path, state, rank=0)
    save_state(
        tmp_path, {**state, "rng": {**state["rng"], "torch": torch.zeros(5, dtype=torch.uint8)}}, rank=1
    )
    raw = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert "rng" not in raw and raw["optimizers"]["main"]["state"][0]["step"] == 1
    assert torch.equal(load_state(tmp_path, rank=1)["rng"]["torch"], torch.zeros(5, dtype=torch.uint8))
    assert load_state(tmp_path, rank=2)["rng"] is None  # a new rank after the world grew
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="no state.pt"):
        load_state(tmp_path / "missing")


def test_local_checkpoint_io_keeps_the_newest(tmp_path):
    io = LocalCheckpointIO(tmp_path, keep=2)
    assert io.restore() is None
    for step in (2, 4, 6):
        io.save({**_state(), "step": step}, step=step, metrics={"m": float(step)})
    assert [p.name for p in io.folders()] == ["step-000000004", "step-000000006"]
    assert io.restore()["step"] == 6
    assert '"m": 6.0' in (io.folders()[-1] / "metrics.json").read_text()


def test_module_states_puts_ema_weights_in_place():
    state = _state()
    state["ema"]["shadow"] = {k: torch.full_like(v, 7.0) for k, v in state["ema"]["shadow"].items()}
    out = module_states(state, ema_module="net")
    assert (out["net"]["weight"] == 7).all()
    assert not (module_states(state, ema_module="net", use_ema=False)["net"]["weight"] == 7).any()
    with pytest.raises(KeyError, match="'gen' is not a module of this state; have \\['net'\\]"):
        module_states(state, ema_module="gen")


def test_rank_helpers_without_a_process_group():
    x = torch.tensor([1.0, 3.0])
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    assert torch.equal(dist.all_reduce_mean(x), x) and dist.all_gather_object("a") == ["a"]
    dist.barrier()


def test_only_the_adapter_imports_ray():
    code = (
        "import sys, components.training.loop, components.training.checkpoint, components.training.ema, "
        "components.training.schedule, components.training.distributed; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'mlflow', 'dvc'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
