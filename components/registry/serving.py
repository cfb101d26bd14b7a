"""The pyfunc contract of a registered generator: a table of requests in, a table of PNG images out.

Input: one row per image. `label` (int; missing, empty or -1: unconditional, the null class of a
conditional model), `seed` (int), and any of the generator's sampling options (its
`default_options` keys, e.g. `steps`, `guidance`, `sampler`, `temperature`); an empty cell keeps the
trained default. Rows with the same seed, the same options and both labelled (or both unlabelled)
are drawn as one batch, in row order, from one `torch.Generator` seeded with that seed: the same
table gives the same images. Give each row its own seed to make each image independent of the rest.

Output: one row per input row, in order: `image` (a base64 PNG, 8-bit grey or RGB), `label` (-1
when unconditional), `seed`. PNG is lossless for 8-bit pixels (the same values as `to_uint8` of the
samples), several times smaller than the pixels as JSON numbers, and every HTTP client (a browser's
`data:image/png;base64,` URL included) decodes it; `decode_images` turns the column back into a
uint8 array for Python callers.

Limits (components/sampling_limits.py, shared with `genpipe sample` and params validation): at
most GENPIPE_MAX_ROWS rows (default 512), checked before any row is read; seeds in [0, 2**63 - 1];
every option finite and within its documented range. Every row is checked, the options of every
sampling call included, before the first image is drawn.

The input schema is not part of the MLflow signature on purpose: MLflow drops a column the schema
does not name with only a warning, so a misspelt option would silently sample with the default.
`predict` checks every column itself, with one-line errors naming the valid ones; the MLmodel
metadata lists them (`metadata["genpipe"]`), and the signature holds the output schema.
"""

from __future__ import annotations

import base64
import io
import math
import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from components.evaluation.grid import to_uint8
from components.generators import Generator, load_generator
from components.sampling_limits import LIMITS, MAX_SEED, check_cap, check_seed

LABEL, SEED, IMAGE = "label", "seed", "image"
UNCONDITIONAL = -1  # label value (as in data/processed) for an unconditional image


def load(model_dir: str, *, device: str | None = None) -> Generator:
    """The generator in `model_dir` on GENPIPE_DEVICE, else CUDA when visible, else the CPU."""
    device = device or os.environ.get("GENPIPE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_generator(model_dir, device=device)


def describe(generator: Generator) -> dict[str, Any]:
    """What a caller needs to build a request: the MLmodel's `metadata["genpipe"]`."""
    return {
        "num_classes": int(generator.num_classes),
        "image_shape": [int(s) for s in generator.image_shape],
        "columns": [LABEL, SEED],
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in generator.default_options.items()},
        "limits": {k: LIMITS[k].rule() for k in generator.default_options if k in LIMITS},
        "seed": f"an integer in [0, {MAX_SEED}]",
        "input": "one row per image: label (int; empty or -1: unconditional), seed (int), sampling options",
        "output": "one row per input row: image (base64 PNG), label, seed",
    }


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _native(value: Any) -> Any:
    """numpy scalars and arrays (what pandas hands back) as plain Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, list, tuple)):
        return tuple(_native(v) for v in value)
    return value


def _integer(value: Any, *, name: str, row: int) -> int:
    value = _native(value)
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise ValueError(f"row {row}: {name}={value!r} must be an integer")
    return int(value)


def _seed(value: Any, *, row: int) -> int:
    seed = _integer(value, name="seed", row=row)
    try:
        return check_seed(seed)
    except ValueError as err:
        raise ValueError(f"row {row}: {err}") from None


def _option(value: Any, default: Any, *, name: str, row: int) -> Any:
    """A cell as the type of the option's default (ints may arrive as floats from a column with gaps)."""
    value = _native(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"row {row}: option {name}={value!r} must be true or false")
        return value
    if isinstance(default, int):
        return _integer(value, name=f"option {name}", row=row)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"row {row}: option {name}={value!r} must be a number")
        # a huge int stays an int (float() would overflow): the shared limits refuse it in one line
        return value if isinstance(value, float) or abs(value) > 2**53 else float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"row {row}: option {name}={value!r} must be a string")
    return value  # None or tuple defaults: the family's own validation judges the value


def sampling_calls(table: pd.DataFrame, generator: Generator) -> list[tuple[int, bool, dict, list[int]]]:
    """Group the rows into sampling calls: (seed, labelled, options, row indices), in first-row order."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"expected a table (pandas DataFrame), got {type(table).__name__}")
    twice = table.columns[table.columns.duplicated()]
    if len(twice):
        count = int((table.columns == twice[0]).sum())
        raise ValueError(f"column {str(twice[0])!r} appears {count} times; give each column once")
    check_cap("rows", len(table), what=None)
    defaults = generator.default_options
    valid = f"label, seed, and the sampling options {', '.join(sorted(defaults))}"
    unknown = [str(c) for c in table.columns if c not in (LABEL, SEED) and c not in defaults]
    if unknown:
        raise ValueError(f"unknown column {unknown[0]!r}; valid: {valid}")
    if SEED not in table.columns:
        raise ValueError(f"column 'seed' is missing; valid: {valid}")
    if len(table) == 0:
        raise ValueError("the table is empty: give one row per image")
    groups: dict[tuple, tuple[int, bool, dict, list[int]]] = {}
    for row, record in enumerate(table.to_dict("records")):
        seed = _seed(record[SEED], row=row)
        label = record.get(LABEL)
        labelled = not _missing(label) and _integer(label, name="label", row=row) != UNCONDITIONAL
        options = {
            k: _option(v, defaults[k], name=k, row=row)
            for k, v in record.items()
            if k in defaults and not _missing(v)
        }
        key = (seed, labelled, tuple(sorted(options.items())))
        if key not in groups:
            try:
                generator.check_options(options)  # names, limits and the family's own rules
            except ValueError as err:
                raise ValueError(f"row {row}: {err}") from None
        groups.setdefault(key, (seed, labelled, options, []))[3].append(row)
    return list(groups.values())


def _labels(table: pd.DataFrame, rows: list[int], *, num_classes: int) -> torch.Tensor:
    labels = [_integer(table[LABEL].iloc[r], name="label", row=r) for r in rows]
    if num_classes == 0:
        raise ValueError(f"row {rows[0]}: this model is unconditional: leave label empty (or -1)")
    for r, y in zip(rows, labels, strict=True):
        if not 0 <= y < num_classes:
            raise ValueError(
                f"row {r}: label={y} must lie in [0, {num_classes}) (or be empty/-1: unconditional)"
            )
    return torch.tensor(labels, dtype=torch.int64)


def encode_png(image: np.ndarray) -> str:
    """A uint8 (H, W, C) image as base64 PNG text."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_images(images: pd.Series | list[str]) -> np.ndarray:
    """The `image` column back into uint8 pixels (n, H, W, C)."""
    from PIL import Image

    out = [np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))) for text in images]
    return np.stack([x[:, :, None] if x.ndim == 2 else x for x in out])


@torch.no_grad()
def predict(generator: Generator, table: pd.DataFrame) -> pd.DataFrame:
    """Sample every row's image (see the module docstring for the contract)."""
    calls = sampling_calls(table, generator)  # every row checked before any sampling
    images: list[str | None] = [None] * len(table)
    labels = [UNCONDITIONAL] * len(table)
    device = torch.device(generator.device)
    for seed, labelled, options, rows in calls:
        ask = _labels(table, rows, num_classes=generator.num_classes) if labelled else len(rows)
        rng = torch.Generator(device=device).manual_seed(seed)
        x = generator.sample(ask, generator=rng, **options)
        pixels = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()  # (n, C, H, W) -> (n, H, W, C)
        for i, row in enumerate(rows):
            images[row] = encode_png(pixels[i])
            if labelled:
                labels[row] = int(ask[i])
    seeds = [_seed(s, row=r) for r, s in enumerate(table[SEED])]
    return pd.DataFrame({IMAGE: images, LABEL: labels, SEED: seeds})
