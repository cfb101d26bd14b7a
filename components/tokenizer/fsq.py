"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple", sec. 3).

Each of the d = len(levels) channels is bounded to L_i values and rounded:
    z_hat_i = round(f(z_i)),  f(z) = tanh(z + s) * h - o,   h = (L - 1)(1 + eps) / 2,
with offset o = 1/2 for even L (so that round gives exactly L integers, -L/2 .. L/2 - 1) and
s = atanh(o / h) so that f(0) = 0 rounds to 0. Rounding passes gradients straight through. Codes are
z_hat / (L // 2) in [-1, 1]. The implicit codebook is the product grid: prod(L_i) codes, with the
bijection index = sum_i (z_hat_i + L_i // 2) * prod_{j<i} L_j. There is no codebook loss.
"""

from __future__ import annotations

import math

import torch

from components.tokenizer.base import Quantizer, QuantizerOutput, batch_diagnostics

EPS = 1e-3  # keeps tanh's bound just above the outer half-levels, as in the paper's reference code


class FiniteScalarQuantizer(Quantizer):
    """z (B, d, h, w) with d = len(levels) -> z_q on the grid, indices (B, h, w)."""

    def __init__(self, *, levels: tuple[int, ...]) -> None:
        super().__init__()
        if len(levels) < 1 or any(n < 2 for n in levels):
            raise ValueError(f"FSQ levels={list(levels)} must be one or more integers >= 2")
        self.levels = tuple(levels)
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        lv = torch.tensor(levels, dtype=torch.float64)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), dim=0)
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        half = (lv - 1) * (1 + EPS) / 2
        # non-persistent: derived from `levels`, which config.json carries
        self.register_buffer("_levels", lv.float(), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half", half.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half).float(), persistent=False)
        self.register_buffer("_width", (lv // 2).float(), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """f(z) = tanh(z + s) * h - o per channel; z (B, d, h, w)."""
        shape = (1, -1, 1, 1)
        return torch.tanh(z + self._shift.view(shape)) * self._half.view(shape) - self._offset.view(shape)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(
                f"FSQ with levels={list(self.levels)} expects (B, {self.dim}, h, w), got {tuple(z.shape)}"
            )
        with torch.autocast(z.device.type, enabled=False):
            bounded = self.bound(z.float())
            z_hat = bounded + (bounded.round() - bounded).detach()  # straight-through rounding
            z_q = z_hat / self._width.view(1, -1, 1, 1)
        indices = self._index(z_hat.detach())
        return QuantizerOutput(
            z_q=z_q,
            loss=z_q.new_zeros(()),
            indices=indices,
            diagnostics=batch_diagnostics(indices, self.codebook_size),
        )

    def _index(self, z_hat: torch.Tensor) -> torch.Tensor:
        """Integer grid point z_hat (B, d, h, w) -> index (B, h, w)."""
        digits = (z_hat.round() + self._width.view(1, -1, 1, 1)).long()  # 0 .. L_i - 1
        return (digits * self._basis.view(1, -1, 1, 1)).sum(dim=1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.unsqueeze(1) // self._basis.view(1, -1, 1, 1)) % self._levels.long().view(
            1, -1, 1, 1
        )
        return (digits.float() - self._width.view(1, -1, 1, 1)) / self._width.view(1, -1, 1, 1)
