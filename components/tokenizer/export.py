"""Load an exported tokenizer (`model.safetensors` + `config.json`) back into a VQGAN."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from components.io import load_model
from components.tokenizer.vqgan import VQGAN


def load_vqgan(model_dir: str | Path | Mapping[str, bytes], *, device: str | torch.device = "cpu") -> VQGAN:
    """Rebuild the VQGAN from its config and weights (a folder, or its files' bytes), in eval mode."""
    state, config = load_model(model_dir)
    vqgan = VQGAN.from_config(config)
    vqgan.load_state_dict(state)
    return vqgan.to(device).eval()
