#!/usr/bin/env bash
# The real pipeline, Ray Train's GPU path included, on a GPU machine that has Python 3.12, PyTorch and
# CUDA but no Ray, MLflow, DVC or network (docs/scale-out.md, "On a GPU machine without Ray or a network").
#
#   scripts/gpu-stages.sh pack [--out FILE]      # here: FILE (.gpr/site.tar.xz): Ray, MLflow, DVC, ...
#   scripts/gpu-stages.sh run|repro [--site FILE] [--cpu] [--preset NAME]... [--set KEY=VALUE]... ARG...
#
# `pack` installs this venv's versions of Ray (train, data), MLflow, DVC, typer, pydantic and
# ruamel.yaml for CPython 3.12 on manylinux x86-64 into a folder, drops what a CUDA PyTorch image
# already has (torch, numpy, pyarrow, pandas, ...) and what no stage imports (Ray's Java jars, RLlib,
# Serve, LLM, the dashboard's and MLflow's web front ends), and writes one tar.xz (~55 MB of the
# device tool's 64 MiB carry). On the GPU machine, `run` and `repro` unpack it under /tmp, put
# `genpipe` and `dvc` commands on PATH where there are none, apply the presets, then
# `train.use_gpu=true` and `evaluate.device=cuda` (unless --cpu), then each --set, all through
# `genpipe preset` (validated, nothing written on a bad key). `repro` then runs `genpipe repro ARG...`
# (DVC targets such as `evaluate@diffusion_pixel`; none: the whole DAG) in a git repository it makes
# if there is none: one local Ray for every stage, the stage server, DVC's order and cache. `run`
# runs each ARG as one `genpipe` stage command (`prepare`, `train_diffusion pixel`, ...) in the order
# given, each in a fresh process with its own Ray, and stops at the first that fails. Both leave in
# $OUT (default /tmp/gpu-stages): log.txt (every line), perf.tsv (each MLflow run's perf/*, final/* and
# eval/* metrics: images/s, peak GPU memory, FD / floor, ...) and results.tgz (reports/, models' json).
set -euo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }
die() { echo "gpu-stages: error: $*" >&2; exit 1; }
say() { echo "gpu-stages: $*" >&2; }

cmd="${1:-}"; [[ $cmd == pack || $cmd == run || $cmd == repro ]] || usage; shift
site=.gpr/site.tar.xz out="" cpu=0 presets=() sets=() stages=()
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --site) site=$2; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --preset) presets+=("$2"); shift 2 ;;
    --set) [[ $2 == *=* ]] || die "--set $2: expected KEY=VALUE"; sets+=("$2"); shift 2 ;;
    -h|--help) usage ;;
    -*) die "unknown option $1" ;;
    *) stages+=("$1"); shift ;;
  esac
done

# What a CUDA PyTorch image ships (pip names): left out of the pack, the image's own versions serve.
IMAGE_HAS="torch numpy scipy pandas pyarrow scikit-learn matplotlib pillow safetensors torchmetrics tqdm
pyyaml requests urllib3 idna certifi charset-normalizer click packaging protobuf grpcio msgpack filelock
fsspec aiohttp aiosignal frozenlist multidict yarl attrs propcache aiohappyeyeballs psutil jinja2 markupsafe
cloudpickle typing-extensions six python-dateutil joblib threadpoolctl contourpy cycler fonttools
kiwisolver pyparsing networkx sympy mpmath triton setuptools rich markdown-it-py mdurl pygments shellingham
werkzeug markdown h11 anyio httpx httpcore lightning-utilities zipp"

pack() {
  local dest=${out:-.gpr/site.tar.xz} py=.venv/bin/python
  [[ -x $py ]] || die "no .venv: run make setup first"
  local reqs
  reqs=$($py -c "from importlib.metadata import version as v
print(' '.join(f'{n}=={v(n)}' for n in ('ray', 'mlflow', 'dvc', 'typer', 'pydantic', 'ruamel.yaml')))")
  reqs=${reqs/ray==/ray[train,data]==}
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  say "installing $reqs for CPython 3.12 into $tmp (the package index, ~2 min)"
  # DVC's hydra needs antlr4's runtime, published as source only: its (pure Python) wheel, built here
  $py -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp/wheels" \
    "antlr4-python3-runtime==$($py -c "from importlib.metadata import version; print(version('antlr4-python3-runtime'))")" \
    >"$tmp/pip.log" 2>&1 || { tail -5 "$tmp/pip.log" >&2; die "could not build antlr4-python3-runtime's wheel"; }
  $py -m pip install -q --disable-pip-version-check --only-binary=:all: --find-links "$tmp/wheels" --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --target "$tmp/site" $reqs >"$tmp/pip.log" 2>&1 \
    || { grep -v "^WARNING: Location" "$tmp/pip.log" | tail -20 >&2; die "pip could not install $reqs for CPython 3.12"; }
  IMAGE_HAS=$IMAGE_HAS $py - "$tmp/site" <<'EOF'
import csv, os, re, shutil, sys
from pathlib import Path
site = Path(sys.argv[1])
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
skip = {norm(n) for n in os.environ["IMAGE_HAS"].split()}
for info in site.glob("*.dist-info"):
    name = norm(info.name[: -len(".dist-info")].rsplit("-", 1)[0])
    if not (name in skip or name.startswith("nvidia-")):
        continue
    tops = {row[0].split("/")[0] for row in csv.reader((info / "RECORD").open()) if not row[0].startswith("..")}
    for top in tops:
        path = site / top
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter path
for part in ("ray/jars", "ray/rllib", "ray/llm", "ray/serve", "ray/dashboard/client/build", "mlflow/server/js/build"):
    shutil.rmtree(site / part, ignore_errors=True)
for cache in list(site.rglob("__pycache__")):
    shutil.rmtree(cache, ignore_errors=True)
EOF
  mkdir -p "$(dirname "$dest")"
  tar -C "$tmp/site" -cf - . | xz -T0 -6 > "$dest.tmp" && mv "$dest.tmp" "$dest"
  say "wrote $dest ($(du -h "$dest" | cut -f1)); the device tool takes its folder in carry (.gpr/ is git-ignored)"
}

setup() {
  out=${out:-${OUT:-/tmp/gpu-stages}}; mkdir -p "$out"
  py=${PYTHON:-python3}; t0=$(date +%s)
  export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
  if [[ -f $site ]]; then
    mkdir -p /tmp/gpu-site && tar -C /tmp/gpu-site -xJf "$site" || die "cannot unpack $site"
    export PYTHONPATH=/tmp/gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  elif [[ $site != .gpr/site.tar.xz ]]; then
    die "$site: not found (make it here with: scripts/gpu-stages.sh pack --out $site)"
  else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import ray, mlflow, torch; print('ray', ray.__version__, 'mlflow', mlflow.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || die "Ray, MLflow or torch does not import (is $site unpacked for this Python?)"
  # DVC runs `genpipe` from PATH, and `genpipe repro` the dvc on PATH when its interpreter has none beside it
  local tool python shims
  python=$($py -c 'import sys; print(sys.executable)')
  shims=$(mktemp -d /tmp/gpu-stages-bin.XXXXXX)
  for tool in genpipe:pipelines.launch dvc:dvc; do
    command -v "${tool%%:*}" >/dev/null && continue
    printf '#!/bin/sh\nexec %s -m %s "$@"\n' "$python" "${tool#*:}" >"$shims/${tool%%:*}"
    chmod +x "$shims/${tool%%:*}"
  done
  export PATH=$PATH:$shims
  g="$py -m pipelines.launch"
  for name in "${presets[@]}"; do $g preset "$name" >/dev/null || die "preset $name"; done
  ((cpu)) || sets=("train.use_gpu=true" "evaluate.device=cuda" "${sets[@]}")
  if ((${#sets[@]})); then
    $py - "${sets[@]}" >presets/gpu-stages-sets.yaml <<'EOF' || die "bad --set"
import sys, yaml
tree = {}
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)
yaml.safe_dump(tree, sys.stdout)
EOF
    $g preset gpu-stages-sets | grep -v "dry-run" || { rm -f presets/gpu-stages-sets.yaml; die "--set rejected"; }
    rm -f presets/gpu-stages-sets.yaml
  fi
  say "ready in $(( $(date +%s) - t0 )) s"
}

run() {
  ((${#stages[@]})) || die "name at least one stage, e.g. prepare train_evaluator"
  setup
  local t s rc=0
  for s in "${stages[@]}"; do
    t=$(date +%s); echo "== $s"
    set +e; $g $s >"$out/stage.log" 2>&1; rc=$?; set -e
    cat "$out/stage.log" >>"$out/log.txt"
    if ((rc)); then tail -20 "$out/stage.log"; echo "-- $s: exit $rc"; break; fi
    grep -v "RayTrainWorker\|WARN\|Warning\|warn(" "$out/stage.log" | tail -4 || true
    grep "RayTrainWorker.*step" "$out/stage.log" | tail -1 | sed 's/^.*) //' | cut -c1-200 || true
    echo "-- $s: $(( $(date +%s) - t )) s"
  done
  rm -f "$out/stage.log"
  report
  return $rc
}

repro() {
  setup
  # DVC wants a git repository, and a copied tree has none: make one, or without git run DVC without one
  if ! command -v git >/dev/null; then
    $py -m dvc config --local core.no_scm true || die "dvc config --local core.no_scm true failed"
  elif ! git rev-parse --git-dir >/dev/null 2>&1; then
    git init -q && git add -A && git -c user.name=gpu-stages -c user.email=gpu-stages@localhost commit -qm "gpu-stages" \
      || die "git could not make a repository here (DVC needs one)"
  fi
  local rc=0
  set +e
  $g repro "${stages[@]}" 2>&1 | tee "$out/log.txt" | grep -v "RayTrainWorker\|WARN\|Warning\|warn(\|images | \|^prepare: [0-9]"
  rc=${PIPESTATUS[0]}
  set -e
  ((rc == 0)) || { echo "-- genpipe repro: exit $rc"; tail -20 "$out/log.txt"; }
  report
  return $rc
}

report() {
  $py - >"$out/perf.tsv" <<'EOF' || say "no MLflow runs to report"
import sys
from pathlib import Path
from mlflow import MlflowClient
from components.config import load_stage
from pipelines.runtime import tracking_uri
cfg = load_stage(Path("params.yaml"), "prepare")["mlflow"]  # the store and experiment the stages used
uri = tracking_uri(cfg)
if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
    sys.exit(1)  # no stage got as far as MLflow: do not make an empty store
client = MlflowClient(tracking_uri=uri)
experiment = client.get_experiment_by_name(cfg.experiment)
runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []
for run in runs:
    for key, value in sorted(run.data.metrics.items()):
        if key.startswith(("perf/", "final/", "eval/")):
            print(f"{run.info.run_name}\t{key}\t{value:.6g}")
EOF
  grep -E "max_mem|samples_per_s|images_per_s|fd_over|cond_acc|test_acc|train_seconds" "$out/perf.tsv" || true
  tar -czf "$out/results.tgz" models/*/*.json reports .genpipe/last_repro.md 2>/dev/null || true
  echo "gpu-stages: $(( $(date +%s) - t0 )) s in all; $out: log.txt perf.tsv results.tgz"
}

"$cmd"
