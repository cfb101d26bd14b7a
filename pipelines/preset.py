"""`genpipe preset NAME`: merge a params overlay (presets/NAME.yaml) into params.yaml.

A preset holds only the keys it changes (capacity, steps, batch: never a size the data gives). It
is merged key by key into params.yaml, comments kept, each changed line's comment replaced by
`preset NAME (was OLD)` so `git diff params.yaml` reads as what the preset did. The merged file is
validated as a whole before it replaces params.yaml (nothing is written on a bad key). DVC's
params tracking then sees the new values in the file it already reads: `dvc repro`, `dvc params
diff` and `dvc exp show` work as for a hand edit. `--sets` prints the same change as `-S` arguments
for `dvc exp run` instead, leaving params.yaml alone.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from components.config import ParamsError, flatten, validate_all
from components.io import atomic_file
from pipelines.lineage import repo_root

PRESETS = "presets"


def preset_dirs() -> list[Path]:
    """Where presets are looked up: the workspace's presets/, then the one beside genpipe's code."""
    own = Path(__file__).resolve().parents[1] / PRESETS
    return list(dict.fromkeys([repo_root() / PRESETS, own]))


def available() -> list[str]:
    return sorted({p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def preset_path(name: str) -> Path:
    for folder in preset_dirs():
        if (path := folder / f"{name}.yaml").is_file():
            return path
    raise ParamsError(f"unknown preset {name!r}; available: {', '.join(available()) or 'none'}")


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: comments, key order and flow style kept
    y.width = 4096  # no re-wrapping of long lines
    y.preserve_quotes = True
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return y


def _load(y, path: Path) -> Any:
    try:
        return y.load(path.read_text())
    except Exception as err:  # ruamel's parser and scanner errors
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # ruamel's commented containers as plain lists


def merge(params: Any, overlay: dict, *, name: str, where: str = "") -> list[str]:
    """Set every leaf of `overlay` in `params` (round-trip mappings), in place; one line per change."""
    changes = []
    for key, value in overlay.items():
        path = f"{where}{key}"
        if key not in params:
            raise ParamsError(
                f"preset {name}: {path} is not a key of params.yaml (a preset only changes keys)"
            )
        if isinstance(value, dict):
            if not isinstance(params[key], dict):
                raise ParamsError(f"preset {name}: {path} is a value in params.yaml, not a section")
            changes += merge(params[key], value, name=name, where=f"{path}.")
            continue
        old = params[key]
        if _plain(old) == _plain(value):
            continue
        params[key] = value
        comments = getattr(params, "ca", None)
        if comments is not None and key in comments.items:
            shown = json.dumps(_plain(old))
            note = comments.items[key][2]
            if note is not None:  # the end-of-line comment: say where the value came from
                rest = note.value.split("\n", 1)[1] if "\n" in note.value else ""  # comment lines below
                note.value = f"# preset {name} (was {shown})\n{rest}"
        changes.append(f"{path}: {json.dumps(_plain(old))} -> {json.dumps(_plain(value))}")
    return changes


def main(*, params: Path, name: str, sets: bool = False) -> list[str]:
    """Apply preset `name` to `params` (or, with `sets`, return its `-S` arguments); the lines to print."""
    y = _yaml()
    overlay = _load(y, preset_path(name))
    if not isinstance(overlay, dict):
        raise ParamsError(f"preset {name}: top level must be a mapping of sections")
    if sets:
        return [f"-S '{key}={json.dumps(_plain(value))}'" for key, value in flatten(overlay).items()]
    if not params.is_file():
        raise ParamsError(f"params file not found: {params}")
    tree = _load(y, params)
    changes = merge(tree, overlay, name=name)
    if not changes:
        return [f"preset {name}: {params} already has every value; nothing changed"]
    text = io.StringIO()
    y.dump(tree, text)
    with atomic_file(params) as tmp:
        tmp.write_text(text.getvalue())
        validate_all(tmp)  # a preset that breaks the params never lands
    return [
        *changes,
        f"preset {name}: {len(changes)} value(s) changed in {params}; "
        "`genpipe repro --dry-run` shows what a run will cost",
    ]
