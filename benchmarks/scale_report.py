"""The Scale section of BENCHMARKS.md, reports/scale.json and reports/scale.png from benchmarks/scale.py's rows."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.scale import BATCH, BIG, BIG_STAGES, REPO, SAMPLE_S, STAGES, STEPS


def _mib(r: dict, key: str) -> str:
    return f"{r[key]:,.0f}" if key in r else "-"


def table(rows: list[dict]) -> str:
    """One line per (stage, N); a `code` column (the commit each row was measured at) when rows carry it."""
    code = any("code" in r for r in rows)
    lines = [
        "| stage | N | wall (s) | images/s | driver peak RSS (MiB) | of it private | worker peak RSS (MiB, max) "
        "| of it private | Ray workers | load 1-min |" + (" code |" if code else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if code else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['n']:,} | {r['wall_s']:.1f} | {r['images_per_s']:,.0f} | {_mib(r, 'driver_peak_mib')} "
            f"| {_mib(r, 'driver_private_mib')} | {_mib(r, 'worker_peak_mib')} | {_mib(r, 'worker_private_mib')} "
            f"| {r['workers']} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |"
            + (f" {r.get('code', '-')} |" if code else "")
        )
    return "\n".join(lines)


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{b[key] / a[key]:.2f}" if a.get(key) and key in b else "-"


def _peak(r: dict, kind: str = "peak") -> float:
    """The largest peak of any one process (the driver or a worker) in MiB; 0 when not measured."""
    return max(r.get(f"driver_{kind}_mib", 0), r.get(f"worker_{kind}_mib", 0))


def ratios(rows: list[dict]) -> str:
    """The issue's targets: 200k vs 20k (images/s >= 0.8x, peak RSS <= 1.3x); 1M peaks under 4 GiB."""
    by = {(r["stage"], r["n"]): r for r in rows}
    out = [
        "| stage | images/s 200k / 20k (target >= 0.8) | peak RSS of any process 200k / 20k (target <= 1.3) "
        "| of it private | driver RSS | worker RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        a, b = by.get((stage, 20_000)), by.get((stage, 200_000))
        if a and b:
            a, b = {**a, "any": _peak(a), "any_private": _peak(a, "private")}, {
                **b, "any": _peak(b), "any_private": _peak(b, "private")}  # fmt: skip
            keys = ("images_per_s", "any", "any_private", "driver_peak_mib", "worker_peak_mib")
            out.append(f"| {stage} | " + " | ".join(_ratio(a, b, k) for k in keys) + " |")
    for stage in BIG_STAGES:
        r = by.get((stage, BIG))
        if r:
            peak = max(r["driver_peak_mib"], r["worker_peak_mib"]) / 1024
            out.append(
                f"\n1M `{stage}`: peak RSS {peak:.2f} GiB in one process (target < 4 GiB), {r['wall_s']:.0f} s"
            )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        rs = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["images_per_s"] for r in rs], "o-", label=stage)
        (line,) = ax2.plot(ns, [_peak(r) for r in rs], "o-", label=f"{stage} RSS")
        private = [(r["n"], _peak(r, "private")) for r in rs if "driver_private_mib" in r]
        if private:
            ax2.plot(*zip(*private, strict=True), "x--", color=line.get_color(), label=f"{stage} private")
    for ax, label in ((ax1, "images/s"), (ax2, "peak RSS of any one process (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("images (N)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle("genpipe data plane: 32x32 RGB shapes, 2 CPUs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def write_section(rows: list[dict], bench_md: Path) -> None:
    """Replace BENCHMARKS.md's "## Scale" section (or append it), keeping everything else."""
    head = "## Scale (`make bench`, `benchmarks/scale.py`)"
    body = (
        f"{head}\n\nProcedural shapes at 32x32 RGB; each (stage, N) in a fresh process with a local Ray of "
        "2 CPUs on this 2-core machine, which other jobs share (the load column: 1-minute load average at "
        "the stage's start and end; figures under load are noisy). `train` is a streamed fit (forced "
        f"streaming path, {STEPS} steps of {BATCH}, one worker; images/s over the steps), `encode` every "
        "split with that tokenizer (EncodeConfig defaults), `stats` the judge's passes over the real data "
        "(`train_evaluator`'s export: test accuracy and feature statistics of train and test in running "
        "sums; the test features `evaluate` streams for precision/recall; an untrained evaluator of the "
        "default size). "
        "Driver peak RSS: getrusage over the process's life (imports included); workers: /proc samples of "
        f"every `ray::` process every {SAMPLE_S} s. RSS also counts the object-store (shared memory) pages a "
        "process has read; `private` is the sampled peak of its RssAnon, the memory it alone holds. "
        "Curves: reports/scale.png.\n\n"
        f"{table(rows)}\n\n{ratios(rows)}\n"
    )
    replace_section(bench_md, head, body)


def replace_section(bench_md: Path, head: str, body: str) -> None:
    """Replace the section of `bench_md` whose heading starts with `head` by `body` (or append it)."""
    text = bench_md.read_text() if bench_md.exists() else "# Benchmarks\n"
    body = body.rstrip("\n") + "\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + body + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    bench_md.write_text(text)


def report(rows: list[dict]) -> None:
    """reports/scale.json, reports/scale.png and BENCHMARKS.md's "## Scale" section from `rows`."""
    (REPO / "reports").mkdir(exist_ok=True)
    (REPO / "reports/scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, REPO / "reports/scale.png")
    write_section(rows, REPO / "BENCHMARKS.md")
