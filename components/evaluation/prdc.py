"""Improved precision and recall (Kynkäänniemi et al. 2019), plus density and coverage (Naeem et al. 2020).

Each set's manifold is the union of balls around its points with radius NND_k, the distance to the
k-th nearest other point of the same set (eq. 1-2 of Kynkäänniemi et al.):

    precision = 1/M sum_j 1[phi_g_j in manifold(real)]      recall = 1/N sum_i 1[phi_r_i in manifold(fake)]
    density   = 1/(k M) sum_j sum_i 1[phi_g_j in B(phi_r_i, NND_k(phi_r_i))]
    coverage  = 1/N sum_i 1[exists j: phi_g_j in B(phi_r_i, NND_k(phi_r_i))]
"""

from __future__ import annotations

import torch

CHUNK = 1024  # query rows per distance block at most
BLOCK_BYTES = 64 * 1024**2  # and fewer when N is large: a (rows, N) float64 block stays under this
# Direct differences, not the matmul expansion: d(a, b) == d(b, a) bit for bit, so a point at exactly
# the k-th neighbour distance is inside that ball whichever side computed it.
EXACT = "donot_use_mm_for_euclid_dist"


def _rows(n: int) -> int:
    """Query rows per block against n points: CHUNK, fewer when a block would pass BLOCK_BYTES."""
    return max(1, min(CHUNK, BLOCK_BYTES // (8 * max(n, 1))))


def knn_radii(f: torch.Tensor, *, k: int) -> torch.Tensor:
    """Distance (N,) from each row of f (N, D) to its k-th nearest other row."""
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k={k} must be in 1..{f.shape[0] - 1} for {f.shape[0]} points")
    f = f.double()
    out = []
    for q in f.split(_rows(f.shape[0])):
        d = torch.cdist(q, f, compute_mode=EXACT)  # (chunk, N)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(out)


def _ball_hits(
    query: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: how many balls contain it (Q,); per ball: whether any query lies in it (N,)."""
    counts, covered = [], torch.zeros(centres.shape[0], dtype=torch.bool)
    centres = centres.double()
    for q in query.double().split(_rows(centres.shape[0])):
        inside = torch.cdist(q, centres, compute_mode=EXACT) <= radii[None, :]  # (chunk, N)
        counts.append(inside.sum(dim=1))
        covered |= inside.any(dim=0)
    return torch.cat(counts), covered


def prdc(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3) -> dict[str, float]:
    """Precision, recall, density and coverage of fake features (M, D) against real features (N, D).

    k=3 is the paper's default (Kynkäänniemi et al. 2019, sec. 3).
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real and fake must be (N, D) and (M, D), got {tuple(real.shape)}, {tuple(fake.shape)}"
        )
    real, fake = real.detach().cpu(), fake.detach().cpu()
    r_real = knn_radii(real, k=k)
    r_fake = knn_radii(fake, k=k)
    counts_fake_in_real, covered_real = _ball_hits(fake, real, r_real)
    counts_real_in_fake, _ = _ball_hits(real, fake, r_fake)
    return {
        "precision": float((counts_fake_in_real > 0).double().mean()),
        "recall": float((counts_real_in_fake > 0).double().mean()),
        "density": float(counts_fake_in_real.double().sum() / (k * fake.shape[0])),
        "coverage": float(covered_real.double().mean()),
    }
