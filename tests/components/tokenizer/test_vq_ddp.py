"""VQ under DDP: two gloo ranks on different data keep one codebook, equal to one process on all data."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.tokenizer.vq import VectorQuantizer

WORLD = 2
STEPS = 6


def _data(rank: int, step: int) -> torch.Tensor:
    """Rank- and step-specific z_e (1, 2, 1, 32); rank 1's data sits elsewhere than rank 0's."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return (torch.randn(32, 2, generator=g) + 3.0 * rank).T[None, :, None, :]


def _quantizer(*, restart: bool) -> VectorQuantizer:
    torch.manual_seed(0)  # same initial codebook on every rank
    return VectorQuantizer(
        codebook_size=16, dim=2, ema=True, decay=0.8, restart_dead=restart, dead_threshold=0.5
    )


def _train(q: VectorQuantizer, data: list[torch.Tensor]) -> None:
    for z in data:
        q(z.requires_grad_(True))
        q.update()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for restart in (False, True):
            torch.manual_seed(rank)  # different RNG streams per rank, as in real training
            q = _quantizer(restart=restart)
            _train(q, [_data(rank, s) for s in range(STEPS)])
            gathered = [torch.empty_like(q.codebook) for _ in range(WORLD)]
            dist.all_gather(gathered, q.codebook)
            result[f"restart={restart}"] = torch.stack(gathered)
            result[f"restarted={restart}"] = torch.tensor(q.num_restarted)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_codebook_identical_across_ranks(tmp_path: Path, free_port: int) -> None:
    out = tmp_path / "codebooks.pt"
    mp.spawn(_worker, args=(free_port, str(out)), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)

    with_restart = result["restart=True"]
    assert int(result["restarted=True"]) > 0, "the test must exercise restarts"
    assert torch.equal(with_restart[0], with_restart[1])

    ema_only = result["restart=False"]
    assert torch.equal(ema_only[0], ema_only[1])
    # all-reduced statistics equal one process seeing both ranks' data in each step
    single = _quantizer(restart=False)
    _train(single, [torch.cat([_data(r, s) for r in range(WORLD)], dim=-1) for s in range(STEPS)])
    assert torch.allclose(ema_only[0], single.codebook, atol=1e-5)
