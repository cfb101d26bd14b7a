"""`make bench`: cost curves of the data plane over N procedural shapes (32x32 RGB, `builtin:shapes`).

For each N in SIZES: `prepare` (the stage's build, on Ray Data from GENPIPE_PREPARE_RAY_FROM images),
a streamed training run (a tiny tokenizer, fixed steps and batch, so images/s compares across N; the
streaming path forced by its thresholds), `encode` (every split, with that tokenizer) and
the judge's passes over the real data (`stats`: `train_evaluator`'s export, i.e. test accuracy
and the evaluator's feature statistics of train and test in running sums, then the test features
`evaluate` streams for precision/recall). BIG (1M) runs `prepare` and `encode` only.

Each (N, stage) runs in a fresh process with its own local Ray (2 CPUs), so peaks do not carry over.
Peak RSS is measured, not estimated: the driver's from getrusage (its whole life), each Ray worker's
from /proc samples every SAMPLE_S of the processes under this driver (workers are named `ray::`),
with the private part (RssAnon) beside it. benchmarks/scale_report.py writes the table into
BENCHMARKS.md ("## Scale", replaced; the rest kept), reports/scale.json and reports/scale.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = (2_000, 20_000, 200_000)
BIG = 1_000_000
STAGES = ("prepare", "train", "encode", "stats")
BIG_STAGES = ("prepare", "encode")
SAMPLE_S = 0.1
STEPS, BATCH = 200, 64  # the streamed fit: 12,800 images whatever N
FORCE_STREAM = {"GENPIPE_IN_DRIVER_BYTES": "0", "GENPIPE_STREAM_BYTES": "0"}
MIB = 1024**2


def _tokenizer():
    from components.tokenizer.config import TokenizerConfig

    return TokenizerConfig(
        autoencoder={
            "in_channels": 3,
            "channels": 16,
            "channel_mult": [1, 2, 2],
            "downsample_factor": 4,
            "num_res_blocks": 1,
            "z_channels": 8,
            "attention": False,
        },
        quantizer={"kind": "vq", "codebook_size": 64, "ema": True},
        loss={"perceptual_weight": 0.0, "disc": {"weight": 0.0}},
    )


def _rss(pid: int) -> tuple[int, int]:
    """(RSS, its private part RssAnon) in bytes from /proc: RSS also counts object-store pages read."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


def ray_workers(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The Ray worker processes among `roots` and their descendants: `ray::...` in their command
    line (Ray sets it), not the raylet's agents. The raylet starts each worker in a process group of
    its own, so a worker is found by descent from its node's processes, not by process group."""
    found = {}
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:  # a root that ended
            continue
        for p in family:
            try:
                line = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if line.startswith("ray::") and not line.split()[0].endswith("Agent"):
                found[p.pid] = p
    return list(found.values())


class Peaks:
    """Peak RSS and its private part (RssAnon) of each process `select()` names, sampled every
    `every` s in a thread: {pid: bytes} in `rss` and `private`, the command lines each pid showed in `names`."""

    def __init__(self, select: Callable[[], Iterable[psutil.Process]], *, every: float = SAMPLE_S) -> None:
        self.select, self.every = select, every
        self.rss: dict[int, int] = {}
        self.private: dict[int, int] = {}
        self.names: dict[int, set[str]] = {}  # a Ray worker's title changes: ray::IDLE, ray::<task>
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            for p in self.select():
                try:
                    rss, anon = _rss(p.pid)
                    self.names.setdefault(p.pid, set()).add(" ".join(p.cmdline()).strip()[:60])
                except (OSError, KeyError, psutil.Error):  # a process that ended between listing and reading
                    continue
                self.rss[p.pid] = max(self.rss.get(p.pid, 0), rss)
                self.private[p.pid] = max(self.private.get(p.pid, 0), anon)

    def peak(self, *, rss: bool = True, but: int | None = None) -> int:
        """The largest peak RSS (or private part) over the sampled processes, `but` one pid."""
        peaks = self.rss if rss else self.private
        return max((v for k, v in peaks.items() if k != but), default=0)

    def __enter__(self) -> Peaks:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def own_peaks() -> Peaks:
    """Peaks of this process and of the Ray workers under it (a local instance it started)."""
    me = psutil.Process()
    return Peaks(lambda: [me, *ray_workers([me])])


# --- the stages (child processes) -----------------------------------------------------------------
def _prepare(n: int, work: Path) -> int:
    from components.data.build import build_dataset
    from components.data.config import PrepareConfig
    from pipelines.prepare import ray_from

    cfg = PrepareConfig(source="builtin:shapes", image_size=32, channels=3, shapes={"count": n, "size": 32})
    report = build_dataset(
        cfg, work / "processed", log=lambda line: print(line, flush=True), ray_from=ray_from()
    )
    return int(sum(report["meta"]["counts"].values()))


def _train(n: int, work: Path) -> tuple[int, float]:
    """(images, images/s over the steps): a streamed fit, the tokenizer exported for encode."""
    from components.data.raydata import training_split
    from components.io import save_model
    from components.tokenizer.task import TokenizerTask
    from components.tokenizer.vqgan import VQGAN
    from components.training.config import LoopConfig, TrainConfig
    from components.training.ray_adapter import fit

    os.environ.update(FORCE_STREAM)
    loop = LoopConfig(steps=STEPS, batch_size=BATCH, lr=2e-3, log_every=50, checkpoint_every=STEPS)
    shutil.rmtree(work / "ray", ignore_errors=True)
    result = fit(
        task_factory=partial(TokenizerTask, _tokenizer(), loop),
        loop=loop,
        train=TrainConfig(num_workers=1, storage_path=str(work / "ray"), max_failures=0),
        run_name=f"scale-{n}",
        datasets={"train": training_split(work / "processed", "train")},
    )
    assert result.data == "streamed", result.data
    vqgan = result.load_module("vqgan", VQGAN(_tokenizer()), ema_module=TokenizerTask.ema_module)
    save_model(work / "tokenizer", vqgan.state_dict(), vqgan.config_dict())
    seconds = result.clock["last_step"] - result.clock["first_step"]
    return STEPS * BATCH, STEPS * BATCH / seconds


def _encode(n: int, work: Path, tokenizer: Path) -> int:
    from components.data.shards import SPLITS
    from components.data.tokens import encode_split, write_token_split
    from components.stages import EncodeConfig

    cfg = EncodeConfig()
    out = work / "tokens"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    total = 0
    for split in SPLITS:
        batches = encode_split(work / "processed", split, model_dir=tokenizer, batch_size=cfg.batch_size)
        cfg_t = _tokenizer()
        _, rows = write_token_split(
            batches,
            out_dir=out,
            split=split,
            grid=(8, 8),
            latent_dim=cfg_t.code_dim,
            shard_rows=cfg.shard_rows,
        )
        total += rows
    return total


def _stats(n: int, work: Path) -> int:
    """The judge's passes over the real data, as the stages run them: `train_evaluator`'s export (test
    accuracy, then the evaluator's feature statistics of train and test as running sums) and the test
    features `evaluate` streams for precision/recall. An untrained evaluator of the default size: the
    cost is the same; the figures are not the point."""
    from components.data.shards import read_meta
    from components.evaluation.batches import SplitImages
    from components.evaluation.evaluator import Evaluator, EvaluatorConfig
    from components.evaluation.scorer import real_features
    from pipelines.train_evaluator import export

    classes = read_meta(work / "processed")["num_classes"]
    torch.manual_seed(0)
    evaluator = Evaluator(EvaluatorConfig(), in_channels=3, num_classes=classes).eval()
    shutil.rmtree(work / "evaluator", ignore_errors=True)
    metrics = export(evaluator, data_dir=work / "processed", out=work / "evaluator")
    assert math.isfinite(metrics["fid_floor"]), metrics
    test = SplitImages(work / "processed", "test")
    features = real_features(evaluator, test, batch_size=256)
    assert features.shape[0] == len(test), (features.shape, len(test))
    train = SplitImages(work / "processed", "train")
    return len(train) + 3 * len(test)  # the test split is read thrice: accuracy, statistics, features


def child(stage: str, n: int, work: Path, tokenizer: Path | None) -> dict:
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    load, me = os.getloadavg()[0], os.getpid()
    with own_peaks() as peaks:
        t0 = time.perf_counter()
        rate = None
        if stage == "prepare":
            images = _prepare(n, work)
        elif stage == "train":
            images, rate = _train(n, work)
        elif stage == "encode":
            images = _encode(n, work, tokenizer or work / "tokenizer")
        else:
            images = _stats(n, work)
        wall = time.perf_counter() - t0
    ray.shutdown()
    return {
        "stage": stage,
        "n": n,
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_s": round(rate if rate is not None else images / wall, 1),
        "driver_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_mib": round(peaks.peak(but=me) / MIB, 1),
        "workers": len(peaks.rss) - (me in peaks.rss),
        "driver_private_mib": round(peaks.private.get(me, 0) / MIB, 1),
        "worker_private_mib": round(peaks.peak(rss=False, but=me) / MIB, 1),
        "load": [round(load, 2), round(os.getloadavg()[0], 2)],
        "code": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
    }


# --- the driver: runs the children, writes the table and the plot ----------------------------------
def run(stage: str, n: int, work: Path, tokenizer: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", stage, "--n", str(n), "--work", str(work)]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    print(f"scale: {stage} N={n} ...", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"scale: {stage} N={n} failed (exit {proc.returncode})")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"scale: {json.dumps(row)}", flush=True)
    with (work.parent / "rows.jsonl").open("a") as f:  # kept as they come: a long run's partial figures
        f.write(json.dumps(row) + "\n")
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--big", type=int, default=BIG, help="N for prepare+encode only; 0 to skip")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "genpipe-scale")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="of each of --sizes")
    ap.add_argument("--child", choices=STAGES)
    ap.add_argument("--n", type=int)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--no-write", action="store_true", help="print only: leave BENCHMARKS.md and reports/")
    ap.add_argument("--report", type=Path, help="write the table and plot from this rows.jsonl; run nothing")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.work, args.tokenizer)))
        return
    if args.report:
        from benchmarks.scale_report import report

        report([json.loads(line) for line in args.report.read_text().splitlines() if line.strip()])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "rows.jsonl").unlink(missing_ok=True)
    rows: list[dict] = []
    tokenizer = args.tokenizer  # else the one trained at the largest of --sizes
    for n in sorted(args.sizes):
        work = args.work / str(n)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for stage in (s for s in STAGES if s in args.stages or s == "prepare"):  # the others read its output
            rows.append(run(stage, n, work, None if "train" in args.stages else tokenizer))
        if (work / "tokenizer").is_dir():
            shutil.rmtree(args.work / "tokenizer", ignore_errors=True)
            shutil.copytree(work / "tokenizer", args.work / "tokenizer")
            tokenizer = args.work / "tokenizer"
        shutil.rmtree(work)  # disk: the next N starts clean
    if args.big:
        if tokenizer is None:
            raise SystemExit("scale: --big needs a tokenizer: give --sizes or --tokenizer")
        work = args.work / str(args.big)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for stage in BIG_STAGES:
            rows.append(run(stage, args.big, work, tokenizer if stage == "encode" else None))
        shutil.rmtree(work)
    from benchmarks.scale_report import ratios, report, table

    print(table(rows) + "\n\n" + ratios(rows))
    if not args.no_write:
        report(rows)


if __name__ == "__main__":
    main()
