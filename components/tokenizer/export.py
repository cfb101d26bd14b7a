"""Load an exported tokenizer (`model.safetensors` + `config.json`) back into a VQGAN."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from components.io import load_model
from components.tokenizer.vqgan import VQGAN

MODEL_FILES = ("model.safetensors", "config.json")


def load_vqgan(model_dir: str | Path, *, device: str | torch.device = "cpu") -> VQGAN:
    """Rebuild the VQGAN from its config and weights, in eval mode."""
    return _build(*load_model(model_dir), device=device)


def vqgan_files(model_dir: str | Path) -> dict[str, bytes]:
    """The exported folder's two files as bytes: what a Ray actor on a node without the folder loads."""
    load_model(model_dir)  # a missing file is a one-line error here, in the driver
    return {name: (Path(model_dir) / name).read_bytes() for name in MODEL_FILES}


def vqgan_from_files(files: dict[str, bytes], *, device: str | torch.device = "cpu") -> VQGAN:
    """load_vqgan for the bytes of `vqgan_files`."""
    return _build(
        load_safetensors(files["model.safetensors"]), json.loads(files["config.json"]), device=device
    )


def _build(state: dict[str, torch.Tensor], config: dict, *, device: str | torch.device) -> VQGAN:
    vqgan = VQGAN.from_config(config)
    vqgan.load_state_dict(state)
    return vqgan.to(device).eval()
