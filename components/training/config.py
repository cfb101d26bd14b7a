"""Configs of the training loop (per stage) and of the distributed run (shared `train` section)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.schema import StrictConfig


class LoopConfig(StrictConfig):
    """What one training run does; each training stage has its own `loop` block."""

    steps: int = Field(gt=0, description="optimizer steps of the main phase (global steps)")
    batch_size: int = Field(gt=0, description="global batch: summed over workers and accumulation")
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(gt=0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    ema_warmup: bool = True  # decay min(ema_decay, (1+t)/(10+t)), as in the usual EMA warm-up
    val_every: int = Field(default=0, ge=0, description="0: validate only at the end")
    checkpoint_every: int = Field(default=0, ge=0, description="0: checkpoint only at the end")
    log_every: int = Field(default=10, gt=0)
    sample_every: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> LoopConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        return self

    def per_worker_batch(self, num_workers: int) -> int:
        """Micro-batch per worker; the global batch must split evenly."""
        denom = num_workers * self.grad_accum
        if self.batch_size % denom:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by num_workers*grad_accum={denom}"
            )
        return self.batch_size // denom


class TrainConfig(StrictConfig):
    """The shared `train` section: how training stages scale and where checkpoints live."""

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=1, gt=0)
    torch_threads: int = Field(default=1, ge=1, description="torch threads per worker")
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    storage_path: str = Field(default=".genpipe/ray_results", min_length=1)
    max_failures: int = Field(default=2, ge=-1)
    num_to_keep: int = Field(default=2, ge=1)
    seed: int = Field(default=0, ge=0)
