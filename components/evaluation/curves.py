"""Training curves as one PNG per run: what a person looks at after training (dvc plots reads the CSV).

Panels against the global step, four to a row: the training losses (`<phase>/loss`) together, each validation
metric (`val/*`) alone since their scales differ, the learning rates (`lr/*`) and the throughput
(`perf/samples_per_s`). A run without per-step metrics
gets a one-panel image that says so (the stage's declared output must still exist).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from components.io import atomic_file

COLUMNS = 4


def _panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(title, metrics) per panel: losses together, each validation metric alone (scales differ)."""
    panels = [("losses", [k for k in keys if k.endswith("/loss") and not k.startswith("val/")])]
    panels += [(k, [k]) for k in keys if k.startswith("val/")]
    panels += [("learning rate", [k for k in keys if k.startswith("lr/")])]
    panels += [("images / s", [k for k in keys if k == "perf/samples_per_s"])]
    return [(title, ks) for title, ks in panels if ks]


def plot_curves(rows: dict[int, dict[str, float]], path: str | Path, *, title: str) -> None:
    """Write the curves of `rows` ({step: {metric: value}}) to a PNG at `path` (atomically)."""
    panels = _panels(sorted({k for values in rows.values() for k in values}))
    cols, nrows = min(max(len(panels), 1), COLUMNS), max(1, -(-len(panels) // COLUMNS))
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), layout="constrained")  # no pyplot: no global state
    if not panels:  # e.g. a forced re-run that found its Ray run finished and trained nothing
        fig.text(0.5, 0.5, "no per-step metrics in this run", ha="center", va="center")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel() if panels else []
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, ks) in zip(axes, panels, strict=False):
        for k in ks:
            steps = sorted(s for s in rows if k in rows[s])
            ax.plot(steps, [rows[s][k] for s in steps], marker="." if len(steps) < 30 else None, label=k)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        if len(ks) > 1 or name != ks[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
