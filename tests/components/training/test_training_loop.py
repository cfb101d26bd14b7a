"""The training loop in one process: accumulation, clipping, LR, EMA, phases, NaN guard, exact resume."""

from __future__ import annotations

import pytest
import torch

from components.training.checkpoint import LocalCheckpointIO, module_states
from components.training.config import LoopConfig
from components.training.loop import NonFiniteError, train
from components.training.schedule import lr_factor

CPU = torch.device("cpu")


def _loop(**kw) -> LoopConfig:
    base = dict(steps=6, batch_size=8, lr=0.1, schedule="constant", grad_clip=None, log_every=1)
    return LoopConfig(**{**base, **kw})


def _weights(task) -> torch.Tensor:
    return task.modules["net"].weight.detach().clone()


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_matches_one_big_batch(toy, accum):
    data = toy.make_data(32)
    results = []
    for grad_accum in (1, accum):
        loop = _loop(grad_accum=grad_accum)
        task = toy.RegressionTask()
        batches = toy.loader_batches(data, batch_size=loop.per_worker_batch(1))
        train(task, loop=loop, batches=batches, device=CPU, progress=False)
        results.append(_weights(task))
    # Same samples per update, loss/grad_accum per micro-batch: only float summation order differs.
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)
    torch.manual_seed(0)
    assert not torch.allclose(results[0], torch.nn.Linear(4, 1, bias=False).weight)  # it did train


def test_clipping_bounds_the_update_and_logs_the_raw_norm(toy, tmp_path):
    sink = toy.JsonlSink(str(tmp_path / "m.jsonl"))
    task = toy.RegressionTask(lr=1.0)
    data = {k: v * 100 for k, v in toy.make_data(8).items() if k == "image"} | {"label": torch.arange(8)}
    loop = _loop(steps=1, grad_clip=0.5)
    torch.manual_seed(0)
    w0 = torch.nn.Linear(4, 1, bias=False).weight.detach().clone()  # what build() draws with seed 0
    train(
        task, loop=loop, batches=toy.loader_batches(data, batch_size=8), device=CPU, sink=sink, progress=False
    )
    step = (_weights(task) - w0).norm().item()
    (row,) = toy.read_jsonl(sink.path)
    assert row["main/grad_norm"] > 100  # pre-clip norm is what gets logged
    assert step == pytest.approx(0.5, rel=1e-5)  # SGD with lr 1: ||delta w|| = clip threshold


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_logged_lr_follows_warmup_then_schedule(toy, tmp_path, schedule):
    sink = toy.JsonlSink(str(tmp_path / "m.jsonl"))
    loop = _loop(steps=10, warmup_steps=3, schedule=schedule, min_lr_ratio=0.2, lr=0.05)
    train(
        toy.RegressionTask(lr=loop.lr),
        loop=loop,
        batches=toy.loader_batches(toy.make_data(16), batch_size=8),
        device=CPU,
        sink=sink,
        progress=False,
    )
    lrs = [r["lr/main"] for r in toy.read_jsonl(sink.path)]
    expected = [
        0.05 * lr_factor(s, steps=10, warmup_steps=3, schedule=schedule, min_lr_ratio=0.2) for s in range(10)
    ]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(0.05 / 4) and lrs[3] == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.05 if schedule == "constant" else 0.01)


def test_ema_tracks_the_weights_with_warmup(toy, tmp_path):
    io = LocalCheckpointIO(tmp_path / "ckpt")
    loop = _loop(steps=5, ema_decay=0.9)
    task = toy.RegressionTask()
    history = []
    original_after = task.after_update
    task.after_update = lambda phase, *, step: (
        history.append(_weights(task)),
        original_after(phase, step=step),
    )
    train(
        task,
        loop=loop,
        batches=toy.loader_batches(toy.make_data(16), batch_size=8),
        device=CPU,
        checkpoint_io=io,
        progress=False,
    )
    torch.manual_seed(0)
    ema = torch.nn.Linear(4, 1, bias=False).weight.detach().clone()  # the initial weights
    for t, w in enumerate(history):
        beta = min(0.9, (1 + t) / (10 + t))
        ema = beta * ema + (1 - beta) * w
    state = io.restore()
    assert state["ema"]["updates"] == 5
    torch.testing.assert_close(state["ema"]["shadow"]["weight"], ema, atol=1e-6, rtol=0)
    exported = module_states(state, ema_module="net")["net"]["weight"]
    torch.testing.assert_close(exported, ema, atol=1e-6, rtol=0)
    assert not torch.allclose(exported, state["modules"]["net"]["weight"])


def test_phases_run_by_every_repeats_and_start_step(toy):
    task = toy.TwoPhaseTask()
    loop = _loop(steps=8, batch_size=4, grad_accum=2)
    train(
        task,
        loop=loop,
        batches=toy.loader_batches(toy.make_data(80), batch_size=2),
        device=CPU,
        progress=False,
    )
    expected = []
    for s in range(8):
        expected += [("d", s)] * 2 * 2  # 2 repeats x 2 micro-batches
        if s >= 3 and s % 2 == 0:
            expected += [("g", s)] * 2
    assert [(p, s) for p, s, _ in task.calls] == expected
    first_labels = [label for *_, label in task.calls]
    assert len(set(first_labels)) == len(first_labels)  # every micro-batch is fresh (36 of one epoch's 40)


@pytest.mark.parametrize(
    ("where", "message"),
    [("loss", "loss 'main/loss' is nan"), ("diagnostic", "diagnostic 'main/mae' is inf")],
)
def test_nonfinite_raises_before_stepping_and_keeps_the_checkpoint(toy, tmp_path, where, message):
    io = LocalCheckpointIO(tmp_path / "ckpt")
    task = toy.RegressionTask(faults=toy.Faults(nonfinite_at=5, nonfinite_in=where))
    with pytest.raises(NonFiniteError, match=f"step 6: {message}"):
        train(
            task,
            loop=_loop(steps=10, checkpoint_every=2),
            batches=toy.loader_batches(toy.make_data(16), batch_size=8),
            device=CPU,
            checkpoint_io=io,
            progress=False,
        )
    assert torch.isfinite(_weights(task)).all()  # the optimizer never stepped on it
    state = io.restore()
    assert state["step"] == 4 and torch.isfinite(state["modules"]["net"]["weight"]).all()


def _resume_run(toy, tmp_path, *, faults, name):
    loop = _loop(
        steps=12,
        grad_accum=2,
        lr=0.01,
        schedule="cosine",
        warmup_steps=2,
        ema_decay=0.95,
        checkpoint_every=4,
        val_every=5,
        grad_clip=1.0,
    )
    task = toy.RegressionTask(lr=loop.lr, opt="adam", noise=0.3, faults=faults)
    io = LocalCheckpointIO(tmp_path / name)
    sink = toy.JsonlSink(str(tmp_path / f"{name}.jsonl"))
    data = toy.make_data(40)  # 10 micro-batches per epoch: epochs turn over mid-run and mid-checkpoint
    kwargs = dict(
        loop=loop,
        batches=toy.loader_batches(data, batch_size=4, seed=3),
        device=CPU,
        seed=5,
        val_batches=lambda: toy.loader_batches(data, batch_size=8)(0),
        checkpoint_io=io,
        sink=sink,
        progress=False,
    )
    return task, kwargs, sink


def test_exact_resume_is_bit_identical_and_logs_each_step_once(toy, tmp_path):
    straight, kwargs, straight_sink = _resume_run(toy, tmp_path, faults=toy.Faults(), name="straight")
    final = train(straight, **kwargs)

    task, kwargs, sink = _resume_run(toy, tmp_path, faults=toy.Faults(interrupt_at=9), name="resumed")
    with pytest.raises(toy.Interrupted):
        train(task, **kwargs)
    assert kwargs["checkpoint_io"].restore()["step"] == 8
    resumed = toy.RegressionTask(lr=0.01, opt="adam", noise=0.3)
    final_resumed = train(resumed, **kwargs)

    a, b = kwargs["checkpoint_io"].restore(), LocalCheckpointIO(tmp_path / "straight").restore()
    assert torch.equal(resumed.modules["net"].weight, straight.modules["net"].weight)
    assert torch.equal(a["ema"]["shadow"]["weight"], b["ema"]["shadow"]["weight"])
    assert torch.equal(
        a["optimizers"]["main"]["state"][0]["exp_avg_sq"], b["optimizers"]["main"]["state"][0]["exp_avg_sq"]
    )
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"]) == (2, 4)
    assert final_resumed["val/mse"] == final["val/mse"]

    rows = toy.read_jsonl(sink.path)
    assert [r["step"] for r in rows] == list(range(1, 13))  # 9 was replayed but not logged again
    ref = {r["step"]: r for r in toy.read_jsonl(straight_sink.path)}
    assert all(r["main/loss"] == ref[r["step"]]["main/loss"] for r in rows)

    again = toy.RegressionTask(lr=0.01, opt="adam", noise=0.3)
    assert train(again, **kwargs) == final_resumed  # a finished run returns its metrics, trains nothing
    assert again.first_step is None


def test_validation_and_samples_do_not_perturb_training(toy, tmp_path):
    weights = []
    for val_every, sample_every in ((0, 0), (2, 3)):
        task = toy.RegressionTask(noise=0.5)
        grids = []
        data = toy.make_data(16)
        train(
            task,
            loop=_loop(steps=6, val_every=val_every, sample_every=sample_every, ema_decay=0.9),
            batches=toy.loader_batches(data, batch_size=8),
            device=CPU,
            val_batches=lambda d=data: toy.loader_batches(d, batch_size=8)(0),
            sample_sink=lambda images, *, step, g=grids: g.append((step, images)),
            progress=False,
        )
        weights.append(_weights(task))
    assert torch.equal(weights[0], weights[1])
    assert [s for s, _ in grids] == [3, 6]
    assert torch.equal(grids[0][1], grids[1][1])  # fixed noise: grids are comparable across steps


def test_unknown_names_raise(toy):
    with pytest.raises(ValueError, match="precision 'fp16'.*fp32, bf16"):
        train(
            toy.RegressionTask(),
            loop=_loop(),
            batches=toy.loader_batches(toy.make_data(8), batch_size=8),
            device=CPU,
            precision="fp16",
        )
    with pytest.raises(ValueError, match="yielded no micro-batch"):
        train(
            toy.RegressionTask(),
            loop=_loop(),
            batches=toy.loader_batches(toy.make_data(4), batch_size=8),
            device=CPU,
        )


def test_bf16_autocast_trains(toy):
    task = toy.RegressionTask()
    metrics = train(
        task,
        loop=_loop(steps=20),
        batches=toy.loader_batches(toy.make_data(32), batch_size=8),
        device=CPU,
        precision="bf16",
        progress=False,
    )
    assert metrics["main/loss"] < 1.0 and torch.isfinite(_weights(task)).all()
