"""VQGAN (Esser et al. 2021, "Taming Transformers", sec. 3.1): x_rec = G(q(E(x))).

E: CNN encoder to z (B, z_channels, H/f, W/f); a 1x1 conv to the quantizer's D channels when they
differ (for FSQ, D = len(levels)); q: a quantizer from the registry; a 1x1 conv back; G: CNN decoder.
`encode_latents` returns the continuous pre-quantization latents, which latent diffusion models
(Rombach et al. 2022) train on and `decode_latents` quantizes and decodes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from components.nn.autoencoder import Decoder, Encoder
from components.tokenizer.base import CodeUsage
from components.tokenizer.config import TokenizerConfig
from components.tokenizer.quantizers import build_quantizer


def _proj(c_in: int, c_out: int) -> nn.Module:
    return nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder; images (B, C, H, W) in [-1, 1] <-> indices (B, H/f, W/f)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        ae, dim = config.autoencoder, config.code_dim
        self.encoder = Encoder(ae)
        self.quant_conv = _proj(ae.z_channels, dim)
        self.quantizer = build_quantizer(config.quantizer, dim=dim)
        self.post_quant_conv = _proj(dim, ae.z_channels)
        self.decoder = Decoder(ae)

    @classmethod
    def from_config(cls, config: TokenizerConfig | dict[str, Any]) -> VQGAN:
        """Build from a TokenizerConfig or its dict (config.json of an exported model)."""
        if not isinstance(config, TokenizerConfig):
            config = TokenizerConfig.model_validate(config)
        return cls(config)

    def config_dict(self) -> dict[str, Any]:
        """JSON-ready config that `from_config` rebuilds this architecture from."""
        return self.config.model_dump(mode="json")

    @property
    def downsample_factor(self) -> int:
        return self.config.autoencoder.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> continuous latents (B, D, H/f, W/f), before quantization."""
        return self.quant_conv(self.encoder(x))

    def encode(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x -> (z_q (B, D, h, w), indices (B, h, w), quantizer loss, diagnostics)."""
        out = self.quantizer(self.encode_latents(x))
        return out.z_q, out.indices, out.loss, out.diagnostics

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, D, h, w) -> x_rec (B, C, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) int64 -> x_rec (B, C, h*f, w*f)."""
        return self.decode(self.quantizer.indices_to_codes(indices))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latents (from `encode_latents` or a latent diffusion model) -> quantize -> decode."""
        return self.decode(self.quantizer(z).z_q)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x -> (x_rec, quantizer loss, indices, diagnostics)."""
        z_q, indices, qloss, diagnostics = self.encode(x)
        return self.decode(z_q), qloss, indices, diagnostics


@torch.no_grad()
def reconstruct(
    vqgan: VQGAN, images: torch.Tensor, *, batch_size: int = 256, usage: CodeUsage | None = None
) -> tuple[torch.Tensor, CodeUsage]:
    """Reconstructions (N, C, H, W) in [-1, 1] on the CPU and the code usage, batch by batch on the
    model's device; `usage` (else a new one) accumulates over calls."""
    device = next(vqgan.parameters()).device
    usage, recons = usage or CodeUsage(vqgan.codebook_size), []
    for x in images.split(batch_size):
        x_rec, _, indices, _ = vqgan(x.to(device))
        recons.append(x_rec.float().clamp(-1, 1).cpu())
        usage.update(indices)
    return torch.cat(recons), usage
