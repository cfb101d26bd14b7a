"""Conditional gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders", eq. 2 and 4, fig. 2), a 256-way categorical per sub-pixel.

Each gated layer has a vertical stack (a k x k conv masked to the rows at and above the centre) and a
horizontal stack (a 1 x k conv masked to the columns left of the centre: type A in the first layer,
which hides the current pixel, type B, which keeps it, afterwards). The vertical stack reaches the
horizontal one only shifted down by a row, which removes the blind spot of the plain PixelCNN:
    v_l = tanh(W_f * v + V_f h_y) o sigmoid(W_g * v + V_g h_y),
    h_l = h + 1x1(gate(W * h + 1x1(shift_down(W * v)) + V h_y)),
with a learned per-class bias V h_y per layer (eq. 4 with a one-hot h); option `class_map_channels`
adds a class- and position-dependent one, V s_y with a learned per-class map s_y (m, H, W) (eq. 5's
spatial conditioning, its map a free parameter per class): the network need not find each pixel's
position from the zero padding to draw a class's shape. Channels: the C sub-pixels
of a pixel are independent given all previous pixels, p(x_i | x_<i, y) = prod_c p(x_i,c | x_<i, y):
the masks hide every channel of the current pixel (no R -> G -> B ordering inside a pixel). For the
default grayscale data this is exact; for RGB it costs some likelihood for much simpler masks.

Likelihood: -log p(x|y) = sum of cross-entropies over the D = C H W sub-pixels, bits/dim =
nats / (D log 2); an untrained model with zero logits scores exactly 8.

Fast sampling (`PixelCNN.generate`): the whole batch is generated together under no_grad, and each
step computes only what the next pixel needs. Per pixel, every layer's horizontal stack is evaluated
at that one position from its (k // 2 + 1)-wide window of the row (the masked half of the kernel);
after a row is complete, every layer's vertical stack is evaluated for that one row from its
(k // 2 + 1)-row window, and the shifted-down links for the next row are cached. Each layer thus runs
once per position overall, as in a single forward pass, instead of H W full forward passes
(the cached path equals `forward` exactly; tests check it). Measured on one contended CPU thread,
default config, 16x16x1, 10 classes: ~45 images/s in batches of 512 (the ~1300 evaluation images
in about 30 s), about the cost of one forward pass over the batch; re-running the full network per
pixel would cost 256 forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from components.evaluation.likelihood import LEVELS, bits_per_dim, to_levels
from components.schema import StrictConfig
from components.training.config import LoopConfig
from components.training.task import Batch, Phase, Task, Wrap
from components.zoo.common import (
    ZooGenerator,
    adamw,
    check_image_shape,
    embedding_rows,
    export_zoo,
    label_rows,
    load_zoo,
    marginal_nll,
    progress_labels,
)

FAMILY = "pixelcnn"


class PixelCNNConfig(StrictConfig):
    """Width, depth and kernel sizes of the gated stacks."""

    channels: int = Field(default=64, ge=2, description="F: features per stack (gates use 2F)")
    layers: int = Field(default=7, ge=1, description="gated layers, the first of type A")
    first_kernel: int = Field(default=7, ge=3, description="k of the first layer (odd)")
    kernel: int = Field(default=5, ge=3, description="k of the later layers (odd)")
    class_map_channels: int = Field(
        default=0,
        ge=0,
        description="0: off; m: a learned per-class map (m, H, W), projected by a 1x1 conv into every "
        "gated layer's gates (a class- and position-dependent bias)",
    )

    @field_validator("first_kernel", "kernel")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"kernel size {k} must be odd (the mask is centred)")
        return k


class MaskedConv2d(nn.Conv2d):
    """A conv whose weight is multiplied by a fixed 0/1 mask (kh, kw) (not saved: derived).

    `forward` is the plain masked conv (the reference); GatedLayer runs only the unmasked half.
    """

    def __init__(self, c_in: int, c_out: int, mask: torch.Tensor) -> None:
        kh, kw = mask.shape
        super().__init__(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))
        self.register_buffer("mask", mask[None, None].clone(), persistent=False)

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)


def vertical_mask(k: int) -> torch.Tensor:
    """k x k: rows at and above the centre (the shift down hides the current row from h)."""
    mask = torch.zeros(k, k)
    mask[: k // 2 + 1] = 1
    return mask


def horizontal_mask(k: int, *, first: bool) -> torch.Tensor:
    """1 x k: columns left of the centre, plus the centre after the first layer (mask B vs A)."""
    mask = torch.zeros(1, k)
    mask[0, : k // 2 + (0 if first else 1)] = 1
    return mask


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of both stacks (fig. 2); the first has no residual on h."""

    def __init__(
        self, c_in: int, features: int, *, k: int, first: bool, rows: int, map_channels: int = 0
    ) -> None:
        super().__init__()
        self.first, self.p = first, k // 2
        self.map_proj = nn.Conv2d(map_channels, 4 * features, 1, bias=False) if map_channels else None
        self.v = MaskedConv2d(c_in, 2 * features, vertical_mask(k))
        self.h = MaskedConv2d(c_in, 2 * features, horizontal_mask(k, first=first))
        self.link = nn.Conv2d(2 * features, 2 * features, 1)
        self.res = nn.Conv2d(features, features, 1)
        self.embed = nn.Embedding(rows, 4 * features) if rows else None

    def _cond(
        self, y: torch.Tensor | None, maps: torch.Tensor | None
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Class biases of the v and h gates: (B, 2F, 1, 1) each, or (B or 1, 2F, H, W) with the class
        maps `maps` (rows, m, H, W) (projected once per class, then picked per sample); 0.0 when neither."""
        if self.map_proj is not None and maps is not None:
            per_class = self.map_proj(maps)  # (rows, 4F, H, W)
            if self.embed is not None:
                per_class = per_class + self.embed.weight[:, :, None, None]
            bias = per_class[:1] if y is None else per_class[y]
        elif self.embed is not None:
            bias = self.embed(y)[:, :, None, None]
        else:
            return 0.0, 0.0
        cv, ch = bias.chunk(2, dim=1)
        return cv, ch

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None, maps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cv, ch = self._cond(y, maps)
        p = self.p
        # Only the unmasked half of each kernel is run (half the work of the masked k x k conv):
        # rows at and above the centre for v (zero rows padded on top), columns up to it for h.
        v_pre = F.conv2d(F.pad(v, (p, p, p, 0)), self.v.masked_weight()[:, :, : p + 1], self.v.bias)
        h_pre = F.conv2d(F.pad(h, (p, 0, 0, 0)), self.h.masked_weight()[:, :, :, : p + 1], self.h.bias)
        down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # row i sees the vertical stack's row i - 1
        h_out = self.res(_gate(h_pre + self.link(down) + ch))
        return _gate(v_pre + cv), h_out if self.first else h + h_out

    def v_row(
        self, window: torch.Tensor, y: torch.Tensor | None, maps_row: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One row of v from its (p + 1)-row window (B, c, p+1, W): (v row, link for the row below);
        `maps_row`: that row of the class maps, (rows, m, 1, W)."""
        cv, _ = self._cond(y, maps_row)
        w = self.v.masked_weight()[:, :, : self.p + 1]  # the rows below the centre are masked anyway
        v_pre = F.conv2d(F.pad(window, (self.p, self.p, 0, 0)), w, self.v.bias)  # (B, 2F, 1, W)
        return _gate(v_pre + cv), self.link(v_pre)

    def pixel_params(
        self, y: torch.Tensor | None, maps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Flat weights for one-position updates of h: the masked half of the 1 x k kernel as a matrix
        (2F, c (p + 1)), its bias plus the class bias ((B or 1, 2F, 1 or H, 1 or W): `h_pixel` picks
        the position), and the residual 1x1 conv as a matrix."""
        _, ch = self._cond(y, maps)
        bias = self.h.bias[None, :, None, None] + ch  # (B or 1, 2F, 1 or H, 1 or W)
        w = self.h.masked_weight()[:, :, 0, : self.p + 1].flatten(1)  # right of the centre: masked
        return w, bias, self.res.weight[:, :, 0, 0], self.res.bias

    def h_pixel(
        self,
        window: torch.Tensor,
        link: torch.Tensor,
        h: torch.Tensor,
        params: tuple[torch.Tensor, ...],
        at: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        """h (B, F) at position `at` = (i, j) from its window (B, c (p + 1)) and the cached link (B, 2F)."""
        w, bias, w_res, b_res = params
        bias = bias[:, :, min(at[0], bias.shape[2] - 1), min(at[1], bias.shape[3] - 1)]  # (B or 1, 2F)
        out = F.linear(_gate(F.linear(window, w) + bias + link), w_res, b_res)
        return out if self.first else h + out


def _rows_up_to(x: torch.Tensor, end: int, size: int) -> torch.Tensor:
    """x's `size` rows ending at row `end` (inclusive), zero-padded above the image, (B, c, size, W)."""
    start = end + 1 - size
    return F.pad(x[:, :, max(start, 0) : end + 1], (0, 0, max(-start, 0), 0))


class PixelCNN(nn.Module):
    """x (B, C, H, W) in [-1, 1], classes -> logits (B, 256, C, H, W) of p(x_i,c | x_<i, y)."""

    def __init__(self, cfg: PixelCNNConfig, *, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.image_shape = check_image_shape(image_shape, multiple=1, family=FAMILY, why="")
        self.cfg, self.num_classes = cfg, num_classes
        c, f, rows = self.image_shape[0], cfg.channels, embedding_rows(num_classes)
        m = cfg.class_map_channels
        self.layers = nn.ModuleList(
            [GatedLayer(c, f, k=cfg.first_kernel, first=True, rows=rows, map_channels=m)]
            + [
                GatedLayer(f, f, k=cfg.kernel, first=False, rows=rows, map_channels=m)
                for _ in range(cfg.layers - 1)
            ]
        )
        # per class (one row when unconditional): m learned maps at full resolution, zero at init
        self.class_map = nn.Parameter(torch.zeros(max(rows, 1), m, *self.image_shape[1:])) if m else None
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(f, f, 1), nn.ReLU(), nn.Conv2d(f, c * LEVELS, 1))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = h.shape
        return self.head(h).view(b, LEVELS, self.image_shape[0], hh, ww)  # channel index = level * C + c

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, y, self.class_map)
        return self._logits(h)

    def nll(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """-log p(x|y) in nats per image, (B,), of x on the 8-bit grid."""
        return F.cross_entropy(self(x, y), to_levels(x), reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def generate(
        self, y: torch.Tensor | None, *, n: int, choose: Callable[[int, int, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Raster-order generation with cached stacks; choose(i, j, logits (n, 256, C)) -> x[:, :, i, j]."""
        c, hh, ww = self.image_shape
        f, pad = self.cfg.channels, max(layer.p for layer in self.layers)
        ref = self.head[-1].weight
        x = ref.new_zeros(n, c, hh, ww)
        maps = self.class_map
        params = [layer.pixel_params(y, maps) for layer in self.layers]
        head = [(m.weight[:, :, 0, 0], m.bias) for m in (self.head[1], self.head[3])]
        vs = [ref.new_zeros(n, f, hh, ww) for _ in self.layers]  # each layer's vertical stack
        # links into row 0 come from the zero padding above the image: link(0) is its bias
        links = [layer.link.bias.view(1, -1, 1).expand(n, -1, ww) for layer in self.layers]  # (n, 2F, W)
        for i in range(hh):
            # row i of x, then of each layer's h, left-padded by `pad` zeros: (n, c or F, pad + W)
            rows = [ref.new_zeros(n, c, pad + ww)] + [ref.new_zeros(n, f, pad + ww) for _ in self.layers]
            for j in range(ww):
                at = pad + j
                for k, layer in enumerate(self.layers):
                    window = rows[k][:, :, at - layer.p : at + 1].flatten(1)
                    rows[k + 1][:, :, at] = layer.h_pixel(
                        window, links[k][:, :, j], rows[k][:, :, at], params[k], (i, j)
                    )
                hidden = F.linear(F.relu(rows[-1][:, :, at]), *head[0])
                logits = F.linear(F.relu(hidden), *head[1]).view(n, LEVELS, c)  # index = level * C + c
                rows[0][:, :, at] = x[:, :, i, j] = choose(i, j, logits)
            if i + 1 < hh:  # row i is complete: the vertical stacks' row i and the links into row i + 1
                src = x
                for k, layer in enumerate(self.layers):
                    maps_row = None if maps is None else maps[:, :, i : i + 1]
                    v_row, link = layer.v_row(_rows_up_to(src, i, layer.p + 1), y, maps_row)
                    vs[k][:, :, i : i + 1], links[k] = v_row, link[:, :, 0]
                    src = vs[k]
        return x


def _levels_to_images(levels: torch.Tensor) -> torch.Tensor:
    return levels.float() * (2 / (LEVELS - 1)) - 1


def sample_images(
    net: PixelCNN, y: torch.Tensor | None, *, n: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """n images in [-1, 1]: inverse-CDF draws from softmax(logits / T), uniforms from `generator`."""
    c, hh, ww = net.image_shape
    device = net.head[-1].weight.device
    u = torch.rand((hh, ww, n, c), generator=generator, device=generator.device).to(device)

    def choose(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(logits.float() / temperature, dim=1).cumsum(dim=1)  # (n, 256, C)
        level = (cdf < u[i, j][:, None, :]).sum(dim=1).clamp_max(LEVELS - 1)
        return _levels_to_images(level)

    return net.generate(y, n=n, choose=choose)


class PixelCNNTask(Task):
    """Cross-entropy in bits/dim with AdamW; `pixelcnn` is averaged and exported."""

    phases = (Phase("main", "main"),)
    ema_module = "pixelcnn"

    def __init__(
        self, model: PixelCNNConfig, loop: LoopConfig, *, image_shape: tuple[int, int, int], num_classes: int
    ) -> None:
        super().__init__()
        self.cfg, self.loop, self.num_classes = model, loop, num_classes
        self.image_shape = check_image_shape(image_shape, multiple=1, family=FAMILY, why="")
        embedding_rows(num_classes)
        self.num_dims = math.prod(self.image_shape)
        self.device = torch.device("cpu")

    def build(self, *, device: torch.device, wrap: Wrap) -> None:
        self.device = torch.device(device)
        net = PixelCNN(self.cfg, image_shape=self.image_shape, num_classes=self.num_classes)
        self.modules = {"pixelcnn": net.to(self.device)}
        self.wrapped = {k: wrap(m) for k, m in self.modules.items()}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return adamw(self.modules["pixelcnn"], self.loop)

    def _bpd(self, batch: Batch) -> torch.Tensor:
        x = batch["image"]
        y = label_rows(batch.get("label"), num_classes=self.num_classes)
        logits = self.wrapped["pixelcnn"](x, y).float()
        nats = F.cross_entropy(logits, to_levels(x), reduction="none").flatten(1).sum(1)
        return bits_per_dim(nats, num_dims=self.num_dims)

    def step(self, phase: str, batch: Batch, *, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if phase != "main":
            raise ValueError(f"unknown phase {phase!r}; valid: ['main']")
        loss = self._bpd(batch).mean()
        return loss, {"bpd": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """bits/dim of -log p(x|y), given the batch labels."""
        total, count = 0.0, 0
        for batch in batches:
            bpd = self._bpd({k: v.to(self.device) for k, v in batch.items()})
            total, count = total + float(bpd.sum()), count + bpd.numel()
        if count == 0:
            raise ValueError("evaluate got no validation samples")
        return {"bpd": total / count}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor:
        labels = progress_labels(n, num_classes=self.num_classes, device=self.device)
        y = label_rows(labels, num_classes=self.num_classes)
        return sample_images(self.modules["pixelcnn"], y, n=n, temperature=1.0, generator=generator)


class PixelCNNGenerator(ZooGenerator):
    """A loaded PixelCNN: cached ancestral sampling at temperature T (logits / T), exact bits/dim."""

    option = "temperature"

    def draw(
        self, y: torch.Tensor | None, *, n: int, generator: torch.Generator, temperature: float
    ) -> torch.Tensor:
        return sample_images(self.net, y, n=n, temperature=temperature, generator=generator)

    @torch.no_grad()
    def bits_per_dim(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """-log p(x) in bits/dim, (n,), under the uniform class mixture (exact; no randomness)."""
        x = images.to(self.device).float()
        nats = marginal_nll(
            lambda y: self.net.nll(x, y), n=x.shape[0], num_classes=self.num_classes, device=self.device
        )
        return bits_per_dim(nats, num_dims=math.prod(self.image_shape))


def export(path: str | Path, *, temperature: float = 1.0, **model: Any) -> None:
    """Write the PixelCNN (`state`: the `pixelcnn` module's, EMA-averaged where kept)."""
    export_zoo(path, family=FAMILY, sampling={"temperature": temperature}, **model)


def load(model_dir: str | Path, *, device: torch.device) -> PixelCNNGenerator:
    """Rebuild an exported PixelCNN in eval mode on `device`."""
    return load_zoo(
        model_dir, device=device, config_cls=PixelCNNConfig, network=PixelCNN, generator_cls=PixelCNNGenerator
    )
