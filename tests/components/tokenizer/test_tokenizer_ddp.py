"""TokenizerTask under real DDP (gloo, 2 ranks): both phases and the adaptive weight run, ranks agree."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from components.tokenizer.config import TokenizerConfig
from components.tokenizer.task import TokenizerTask
from components.training.config import LoopConfig

WORLD = 2


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # DDP broadcasts rank 0's initial weights
        cfg = TokenizerConfig(
            autoencoder=dict(
                in_channels=1,
                channels=8,
                channel_mult=(1, 2),
                downsample_factor=2,
                num_res_blocks=1,
                z_channels=8,
            ),
            quantizer={"kind": "vq", "codebook_size": 16, "restart_dead": True, "dead_threshold": 2.0},
            loss={"perceptual_weight": 0.0, "disc": {"layers": 1, "channels": 8, "start_step": 1}},
        )
        task = TokenizerTask(cfg, LoopConfig(steps=4, batch_size=8, lr=1e-3))
        task.build(device=torch.device("cpu"), wrap=DistributedDataParallel)
        opts = task.optimizers()
        for step in range(4):
            x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(10 * rank + step)) * 2 - 1
            for phase in task.phases:
                if phase.active(step):
                    opts[phase.optimizer].zero_grad(set_to_none=True)
                    loss, _ = task.step(phase.name, {"image": x}, step=step)
                    loss.backward()
                    opts[phase.optimizer].step()
                    task.after_update(phase.name, step=step)
        flat = torch.cat(
            [p.detach().flatten() for m in task.modules.values() for p in m.state_dict().values()]
        )
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            restarted = torch.tensor(task.modules["vqgan"].quantizer.num_restarted)
            torch.save({"states": torch.stack(gathered), "restarted": restarted}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_stay_identical(tmp_path: Path, free_port: int) -> None:
    out = tmp_path / "states.pt"
    mp.spawn(_worker, args=(free_port, str(out)), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    assert int(result["restarted"]) > 0
    assert torch.equal(result["states"][0], result["states"][1])
