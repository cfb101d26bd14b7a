"""`make bench` (diffusion): Fréchet distance against NFE for each sampler (Karras et al. 2022, Fig. 2).

(a) The trained default pixel model (models/diffusion_pixel): every sampler valid for its objective
    (`VALID_SAMPLING`) over a range of steps, and Heun with churn (EDM Algorithm 2).
(b) A DDPM-objective model with the same backbone and loop (params.yaml `train_diffusion.pixel` with
    `objective: ddpm`), trained here in a plain process on in-memory batches: ddpm and ddim on its
    own timesteps (trailing), euler and heun on EDM's karras grid. The reference is 1000-step DDPM
    ancestral sampling (Ho et al. 2020, Algorithm 2); EDM reaches its FID with 35 NFE of Heun.
For every curve: the smallest NFE whose FD reaches the reference FD, interpolated in log NFE.
Every point is the one judge (`judge.judge`): N class-balanced samples on fixed seeds (the same
initial noise for every setting), N = the train split's size by default, FD on the evaluator's
features against the test statistics. Writes reports/plots/diffusion_fd_nfe.{csv,png} and
reports/bench_diffusion.json. Training throughput through Ray Train is a row of benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.data.readers import ShardDataset, epoch_batches
from components.diffusion.config import VALID_SAMPLING, DiffusionConfig, SamplingConfig
from components.diffusion.generator import export
from components.diffusion.task import DiffusionTask
from components.evaluation.evaluator import load_evaluator
from components.evaluation.judge import judge
from components.evaluation.reference import load_reference
from components.generators import Generator, load_generator
from components.training.checkpoint import LocalCheckpointIO, module_states
from components.training.config import LoopConfig
from components.training.loop import train

COLUMNS = ("model", "sampler", "discretization", "steps", "nfe", "fd", "fd_over_floor", "cond_accuracy")
TRAIN_FACTS = "bench_train.json"  # how train_ddpm trained an exported model
REF_STEPS = 1000  # DDPM's T: ancestral sampling through every step of the chain
#: EDM Table 5's ImageNet-64 stochastic settings (S_churn, S_tmin, S_tmax, S_noise).
CHURN = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
#: sampler -> steps of each curve (full run); heun 18 steps = 35 NFE, EDM's figure.
STEPS = {
    "euler": (4, 8, 16, 32),
    "heun": (2, 4, 8, 18),
    "heun+churn": (4, 8, 18),
    "ddim": (4, 8, 16, 32, 64),
    "ddpm": (16, 32, 64, 128, 256),
}
QUICK_STEPS = {"euler": (1, 2), "heun": (1, 2), "heun+churn": (2,), "ddim": (1, 2), "ddpm": (2,)}


@dataclass(frozen=True)
class Curve:
    """One line of the figure: a sampler on one discretization, with its extra options."""

    label: str  # "heun+churn" for Heun with CHURN
    sampler: str
    discretization: str
    steps: tuple[int, ...]
    options: dict = field(default_factory=dict, hash=False)

    def settings(self, steps: int) -> dict:
        return {
            "sampler": self.sampler,
            "discretization": self.discretization,
            "steps": steps,
            **self.options,
        }


def curves(objective: str, steps: dict[str, tuple[int, ...]], *, churn: bool) -> list[Curve]:
    """Every sampler valid for `objective`: on karras where valid, else on the objective's own timesteps."""
    out = []
    for sampler, grids in VALID_SAMPLING[objective].items():
        disc = "karras" if "karras" in grids else ("trailing" if "trailing" in grids else grids[0])
        out.append(Curve(sampler, sampler, disc, steps[sampler]))
        if sampler == "heun" and churn and steps.get("heun+churn"):
            out.append(Curve("heun+churn", "heun", disc, steps["heun+churn"], dict(CHURN)))
    return out


def nfe_to_reach(points: list[tuple[float, float]], target: float) -> dict:
    """Smallest NFE with FD <= target on a curve of (nfe, fd), linear in log NFE between the bracketing points.

    `reached` is False when no point gets there; `at_first` when the curve's first point already does
    (the true NFE is then at most that one).
    """
    points = sorted(points)
    for i, (n, fd) in enumerate(points):
        if fd <= target:
            if i == 0:
                return {"nfe": n, "reached": True, "at_first": True}
            n0, fd0 = points[i - 1]
            t = (fd0 - target) / (fd0 - fd)
            return {
                "nfe": math.exp(math.log(n0) + t * (math.log(n) - math.log(n0))),
                "reached": True,
                "at_first": False,
            }
    return {"nfe": None, "reached": False, "at_first": False}


@dataclass
class Judge:
    """The evaluate stage's scoring, set up once: evaluator, test images and statistics, floor."""

    evaluator_dir: Path
    data: Path
    n: int
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.evaluator = load_evaluator(self.evaluator_dir, device=self.device).float()
        self.test = ShardDataset(self.data, "test")
        reference = load_reference(self.evaluator_dir)
        self.test_stats, self.floor = reference.test, reference.floor

    def curve(self, generator: Generator, curve: Curve, *, model: str, log=print) -> list[dict]:
        """One CSV row per step count of `curve`: all N samples in one batch."""
        rows = []
        for steps in curve.steps:
            tic = time.perf_counter()
            m = judge(
                generator,
                evaluator=self.evaluator,
                test_images=self.test.images,
                test_stats=self.test_stats,
                floor=self.floor,
                n=self.n,
                seed=self.seed,
                batch_size=self.n,
                options=curve.settings(steps),
            ).metrics
            row = {
                "model": model,
                "sampler": curve.label,
                "discretization": curve.discretization,
                "steps": steps,
                "nfe": int(m["nfe"]),
                "fd": m["fid"],
                "fd_over_floor": m["fid_over_floor"],
                "cond_accuracy": m.get("cond_accuracy", float("nan")),
            }
            log(
                f"diffusion bench: {model} {curve.label} {steps} steps ({row['nfe']} NFE): FD {row['fd']:.4g} "
                f"({row['fd_over_floor']:.2f}x floor), acc {row['cond_accuracy']:.3f} [{time.perf_counter() - tic:.0f} s]"
            )
            rows.append(row)
        return rows


def train_ddpm(
    params: Path, data: Path, folder: Path, *, steps: int | None, seed: int = 0, device: str = "cpu"
) -> tuple[Generator, dict]:
    """params.yaml's train_diffusion.pixel with objective ddpm, trained in this process; (generator, facts)."""
    from components.config import load_stage
    from components.diffusion.sizing import resolve_backbone

    cfg = load_stage(params, "train_diffusion")["train_diffusion"].pixel
    ds = ShardDataset(data, "train")
    meta, size = ds.meta, ds.meta["image_size"]
    resolved = resolve_backbone(
        cfg, variant="pixel", channels=meta["channels"], num_classes=meta["num_classes"], size=size
    )
    model = DiffusionConfig.model_validate({**resolved.model_dump(), "objective": "ddpm"})
    sampling = SamplingConfig(sampler="ddpm", discretization="trailing", steps=model.num_timesteps)
    steps = steps or cfg.loop.steps
    loop = LoopConfig.model_validate(
        {
            **cfg.loop.model_dump(),
            "steps": steps,
            "warmup_steps": min(cfg.loop.warmup_steps, steps // 10),
            "log_every": min(cfg.loop.log_every, steps),
            "val_every": 0,
            "checkpoint_every": 0,  # only at the end: the EMA weights to export
            "sample_every": 0,
        }
    )
    image_shape = (meta["channels"], size, size)
    task = DiffusionTask(
        model, loop, sampling=sampling, num_classes=meta["num_classes"], image_shape=image_shape
    )
    io = LocalCheckpointIO(folder / "checkpoints")
    tic = time.perf_counter()
    metrics = train(
        task,
        loop=loop,
        batches=epoch_batches({"image": ds.images, "label": ds.labels}, batch=loop.batch_size, seed=seed),
        device=torch.device(device),
        checkpoint_io=io,
        seed=seed,
        progress=False,
    )
    wall = time.perf_counter() - tic
    state = module_states(io.restore(), ema_module=DiffusionTask.ema_module)["denoiser"]
    export(
        folder / "ddpm",
        denoiser_state=state,
        model=model,
        sampling=sampling,
        image_shape=image_shape,
        num_classes=meta["num_classes"],
    )
    facts = {
        "train_steps": steps,
        "batch_size": loop.batch_size,
        "train_wall_s": wall,
        "train_images_per_s": metrics.get("perf/samples_per_s"),
        "final_loss": metrics.get("main/loss"),
    }
    (folder / "ddpm" / TRAIN_FACTS).write_text(json.dumps(facts, indent=2))
    return load_generator(folder / "ddpm", device=device), facts


def load_ddpm(folder: Path, *, device: str) -> tuple[Generator, dict]:
    """A model `train_ddpm` exported to `folder` (its training facts when it left them)."""
    generator = load_generator(folder, device=device)
    if generator.model.objective != "ddpm":
        raise SystemExit(f"--ddpm-model {folder}: objective {generator.model.objective!r}, need 'ddpm'")
    facts = folder / TRAIN_FACTS
    return generator, {
        "loaded_from": str(folder),
        **(json.loads(facts.read_text()) if facts.is_file() else {}),
    }


def plot(rows: list[dict], *, reference: float, floor: float, out: Path) -> None:
    """FD against NFE (log-log), one line per (model, sampler), the reference FD as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {}
    for r in rows:
        styles.setdefault(r["model"], ("-", "--", ":", "-.")[len(styles) % 4])
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        lines.setdefault((r["model"], r["sampler"]), []).append((r["nfe"], r["fd"]))
    for (model, sampler), pts in lines.items():
        pts.sort()
        ax.plot(*zip(*pts, strict=True), styles[model], marker="o", ms=3, label=f"{model}: {sampler}")
    ax.axhline(reference, color="k", lw=1, label=f"{REF_STEPS}-step DDPM ancestral (reference)")
    ax.axhline(floor, color="grey", lw=1, ls=":", label="real-vs-real floor")
    ax.set(
        xscale="log", yscale="log", xlabel="NFE (network evaluations per sample)", ylabel="Fréchet distance"
    )
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_steps(items: list[str], base: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`sampler=4,8,16` overrides of a step table; an unknown sampler names the valid ones."""
    out = dict(base)
    for item in items:
        name, _, values = item.partition("=")
        if name not in out or not values:
            raise SystemExit(f"--steps {item!r}: use SAMPLER=N,N,... with SAMPLER one of {', '.join(out)}")
        out[name] = tuple(int(v) for v in values.split(","))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny N, steps and training: checks the script")
    parser.add_argument("--model", type=Path, default=Path("models/diffusion_pixel"))
    parser.add_argument("--evaluator", type=Path, default=Path("models/evaluator"))
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports"),
        help="writes plots/diffusion_fd_nfe.*, bench_diffusion.json",
    )
    parser.add_argument(
        "--n", type=int, default=None, help="samples per point; default: the train split's size"
    )
    parser.add_argument(
        "--steps", nargs="*", default=[], metavar="SAMPLER=N,N", help="override a curve's steps"
    )
    parser.add_argument(
        "--ref-steps", type=int, default=None, help=f"DDPM ancestral reference steps ({REF_STEPS})"
    )
    parser.add_argument(
        "--train-steps", type=int, default=None, help="DDPM model steps; default params' loop.steps"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (sampling and the DDPM model's training)"
    )
    parser.add_argument(
        "--ddpm-model",
        type=Path,
        default=None,
        help="reuse a ddpm model exported by train_ddpm (folder/ddpm)",
    )
    parser.add_argument("--no-default", action="store_true", help="skip (a): only the DDPM model's curves")
    parser.add_argument("--no-churn", action="store_true", help="skip Heun with churn")
    # One thread: on this shared 2-core machine two threads ran the quick path ~10x slower (oversubscribed).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in (args.evaluator, args.data) if args.no_default else (args.model, args.evaluator, args.data):
        if not path.is_dir():
            raise SystemExit(f"diffusion bench: {path} not found: run `make run` (dvc repro) first")
    steps = parse_steps(args.steps, QUICK_STEPS if args.quick else STEPS)
    ref_steps = args.ref_steps or (8 if args.quick else REF_STEPS)
    n = args.n or (48 if args.quick else ShardDataset(args.data, "train").meta["counts"]["train"])
    train_steps = args.train_steps or (4 if args.quick else None)
    scorer = Judge(args.evaluator, args.data, n, device=args.device)
    tic = time.perf_counter()

    # Both models first (a DDPM model the loaded or trained way), then every curve: fails before sampling.
    default = None if args.no_default else load_generator(args.model, device=args.device)
    ddpm_name = "ddpm (trained here)"
    with tempfile.TemporaryDirectory(prefix="genpipe-bench-ddpm-") as tmp:
        if args.ddpm_model is not None:
            ddpm, ddpm_facts = load_ddpm(args.ddpm_model, device=args.device)
        else:
            ddpm, ddpm_facts = train_ddpm(
                args.params, args.data, Path(tmp), steps=train_steps, device=args.device
            )
    print(f"diffusion bench: ddpm model: {ddpm_facts}")
    # (a) the trained default model, every sampler valid for its objective
    rows = []
    if default is not None:
        name = f"{args.model.name} ({default.model.objective})"
        for c in curves(default.model.objective, steps, churn=not args.no_churn):
            rows += scorer.curve(default, c, model=name)
    # (b) the DDPM model's samplers, its ancestral curve ending at the 1000-step reference
    ddpm_steps = {**steps, "ddpm": tuple(sorted({*steps["ddpm"], ref_steps}))}
    for c in curves("ddpm", ddpm_steps, churn=False):
        rows += scorer.curve(ddpm, c, model=ddpm_name)
    reference = next(
        r["fd"]
        for r in rows
        if r["model"] == ddpm_name and r["sampler"] == "ddpm" and r["steps"] == ref_steps
    )

    reach = {}
    for key in dict.fromkeys((r["model"], r["sampler"]) for r in rows):
        pts = [(r["nfe"], r["fd"]) for r in rows if (r["model"], r["sampler"]) == key]
        reach[f"{key[0]}: {key[1]}"] = nfe_to_reach(pts, reference)
    plots = args.out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    with (plots / "diffusion_fd_nfe.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, reference=reference, floor=scorer.floor, out=plots / "diffusion_fd_nfe.png")
    report = {
        "n": n,
        "seed": scorer.seed,
        "floor": scorer.floor,
        "reference": {"sampler": "ddpm", "discretization": "trailing", "steps": ref_steps, "fd": reference},
        "nfe_to_reference": reach,
        "ddpm_model": ddpm_facts,
        "default_model": None
        if default is None
        else {"dir": str(args.model), "objective": default.model.objective},
        "rows": rows,
        "wall_s": time.perf_counter() - tic,
    }
    (args.out / "bench_diffusion.json").write_text(json.dumps(report, indent=2))
    print(
        f"\ndiffusion bench: reference FD {reference:.4g} ({ref_steps}-step DDPM ancestral), floor {scorer.floor:.4g}"
    )
    print("| model: sampler | NFE to reach the reference FD |\n|---|---|")
    for key, r in reach.items():
        shown = "not reached" if not r["reached"] else f"{'≤ ' if r['at_first'] else ''}{r['nfe']:.1f}"
        print(f"| {key} | {shown} |")
    return report


if __name__ == "__main__":
    main()
