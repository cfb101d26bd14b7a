"""`genpipe sample MODEL@ALIAS`: N images from a registered generator, written as one PNG grid.

The version's pyfunc model is downloaded once per logged model into `.genpipe/models/<model_id>`
and asked for the images in batches of `batch_size` table rows (components/registry/serving.py);
batch i draws from seed `seed * 1_000_003 + i`, the evaluate stage's rule, so a command line gives
the same grid every time (batch seeds wrap modulo 2**63, which changes nothing below seed 9.2e12).

Checked before the model is even downloaded: the counts against the caps (GENPIPE_MAX_IMAGES
images per call, GENPIPE_MAX_ROWS per batch), the seed (in [0, 2**63 - 1]), every option value
against components/sampling_limits.py, and `--out` (a PNG path whose folder can be written). Then
the model, alias, option names and label; the generator checks combinations on the first batch.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from components.evaluation.grid import make_grid, save_png
from components.evaluation.judge import batch_seed
from components.registry.registry import load_pyfunc
from components.registry.serving import IMAGE, LABEL, SEED, UNCONDITIONAL, decode_images
from components.sampling_limits import check_cap, check_option, check_seed
from pipelines.lineage import repo_root
from pipelines.promote import resolve, store_uri

CACHE = ".genpipe/models"  # under the repo root: one folder per logged model id


def parse_target(target: str) -> tuple[str, str | None, str | None]:
    """`MODEL@ALIAS` or `MODEL@vN` -> (registered name, alias, version); no `@` means `@champion`."""
    model, _, at = target.partition("@")
    name = resolve(model)
    at = at or "champion"
    if re.fullmatch(r"v\d+", at):  # MLflow forbids aliases of this form: it is a version
        return name, None, at[1:]
    return name, at, None


def _labels(label: int | None, n: int, num_classes: int, target: str) -> list[int]:
    if num_classes == 0:
        if label not in (None, UNCONDITIONAL):
            raise ValueError(f"{target} is unconditional: drop --label (or give -1)")
        return [UNCONDITIONAL] * n
    if label is None:
        return [i % num_classes for i in range(n)]  # every class in turn
    if label != UNCONDITIONAL and not 0 <= label < num_classes:
        raise ValueError(f"--label {label} is not valid; choose 0..{num_classes - 1} (or -1: unconditional)")
    return [label] * n


def check_out(out: Path) -> None:
    """Fail unless a PNG can be written at `out`: not a folder, under a folder that can be written."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file path such as {out / 'samples.png'}")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the grid is written as PNG; give a path ending in .png")
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a folder")
    try:  # what save_png does: missing folders made, a temporary file beside the grid
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".genpipe-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write into {existing} ({err.strerror})") from None


def check_request(*, n: int, batch_size: int, nrow: int | None, seed: int, out: Path, options: dict) -> dict:
    """Everything that needs no model: counts, caps, seed, option values, the output path."""
    if n < 1 or batch_size < 1 or (nrow is not None and nrow < 1):
        raise ValueError(f"-n {n}, --batch-size {batch_size} and --nrow {nrow} must be at least 1")
    check_cap("images", n, what="-n")
    check_cap("rows", batch_size, what="--batch-size")
    check_seed(seed, what="--seed")
    options = {name: check_option(name, value) for name, value in options.items()}
    check_out(out)
    return options


def main(
    *,
    params: Path,
    target: str,
    n: int,
    out: Path,
    label: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    nrow: int | None = None,
    options: dict[str, Any] | None = None,
) -> Path:
    """Sample `n` images from `target` and write them as a grid PNG to `out` (atomically)."""
    from tqdm import tqdm

    options = check_request(n=n, batch_size=batch_size, nrow=nrow, seed=seed, out=out, options=options or {})
    uri = store_uri(params)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # anything MLflow resolves on its own sees this store
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # ours is the one bar
    name, alias, version = parse_target(target)
    try:
        model, mv = load_pyfunc(
            tracking_uri=uri, name=name, alias=alias, version=version, cache=repo_root() / CACHE
        )
    except LookupError as err:
        raise ValueError(str(err)) from None
    about = model.metadata.metadata["genpipe"]
    unknown = sorted(set(options) - set(about["options"]))
    if unknown:
        raise ValueError(
            f"{name} has no sampling option {unknown[0]!r}; valid: {', '.join(sorted(about['options']))}"
        )
    labels = _labels(label, n, about["num_classes"], target)
    table = pd.DataFrame({LABEL: labels})
    table[SEED] = [batch_seed(seed, i // batch_size) % 2**63 for i in range(n)]
    for key, value in options.items():
        table[key] = [value] * n
    images, bar = [], None
    for start in range(0, n, batch_size):
        got = model.predict(table.iloc[start : start + batch_size].reset_index(drop=True))
        images.append(decode_images(got[IMAGE]))
        # The bar starts once the first batch passed the generator's option checks: an error stays one line.
        bar = bar or tqdm(total=n, unit="img", desc=f"{name} v{mv.version}", file=sys.stderr)
        bar.update(len(got))
    bar.close()
    pixels = torch.from_numpy(np.concatenate(images))
    x = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # uint8 (n, H, W, C) -> [-1, 1] (n, C, H, W)
    balanced = label is None and about["num_classes"] > 0
    columns = nrow or (about["num_classes"] if balanced else math.ceil(math.sqrt(n)))
    grid = make_grid(x, nrow=columns)
    try:
        save_png(grid, out)
    except OSError as err:  # e.g. the disk filled while sampling: name the user's path, not the temp file
        raise ValueError(f"--out {out}: cannot write ({err.strerror or err})") from None
    print(
        f"sample: {n} images from {name} v{mv.version} ({alias or 'version ' + mv.version}) -> {out} "
        f"({grid.shape[1]}x{grid.shape[0]} px)"
    )
    return out


def parse_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with a YAML value (`steps=18`, `sampler=euler`, `guidance_interval=[0.2, 2]`)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option {text!r} must be KEY=VALUE, e.g. --option steps=18")
    return key.strip(), yaml.safe_load(value)
