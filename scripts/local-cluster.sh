#!/usr/bin/env bash
# A Ray cluster and an MLflow tracking server as separate processes on this machine: the way a
# cluster runs, to try scale-out before renting one.
#
#   scripts/local-cluster.sh up [--nodes N] [--cpus N] [--head-cpus N] [--port P] [--mlflow-port P] [--host IP] [--dir DIR] [--artifacts URI] [--isolate] [--hide DIR]...
#   source .genpipe/cluster/env            # RAY_ADDRESS, RAY_AUTH_MODE, MLFLOW_TRACKING_URI
#   .venv/bin/genpipe exp run -S train.num_workers=2 train_evaluator   # one worker per node
#   scripts/local-cluster.sh add [--dir DIR]   # one more node (e.g. after one was killed)
#   scripts/local-cluster.sh down [--dir DIR]
#
# `up` starts a head (`ray start --head --block`, --head-cpus CPUs, default --cpus), N-1 more nodes
# (`ray start --address --block`) with --cpus CPUs each, and `mlflow server` (SQLite in DIR,
# artefacts in DIR or at --artifacts, e.g. s3://bucket/prefix/mlartifacts), each in its own process
# group; it waits until all N nodes are alive and the server answers, then writes DIR/env and prints
# the node ids. Every process inherits this shell's environment, AWS_* credentials and endpoint
# included. --isolate starts each non-head node in its own mount namespace (root: `unshare --mount`)
# where this checkout, and every --hide DIR, is an empty tmpfs except .venv: such a node has the
# environment but not the code or the data, as a cluster node that shares only a bucket; genpipe
# ships its code to it (Ray's py_modules). `add` starts one more node the same way. `down` signals
# those process groups: never `ray stop`, which stops every Ray instance on the machine, other
# users' included. Logs: DIR/*.log.
set -euo pipefail

usage() { sed -n '5,9p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }
say() { echo "local-cluster: $*" >&2; }

cmd="${1:-}"; [[ $cmd == up || $cmd == add || $cmd == down ]] || usage; shift
nodes=2 cpus=1 head_cpus="" port=6379 mlflow_port=5000 host=127.0.0.1 dir=.genpipe/cluster artifacts="" isolate=0
hide=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == --isolate ]]; then isolate=1; shift; continue; fi
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case "$1" in
    --nodes) nodes=$2 ;; --cpus) cpus=$2 ;; --head-cpus) head_cpus=$2 ;; --port) port=$2 ;;
    --mlflow-port) mlflow_port=$2 ;; --host) host=$2 ;; --dir) dir=$2 ;; --artifacts) artifacts=$2 ;;
    --hide) [[ -d $2 ]] || die "--hide $2: not a directory"; hide+=("$(cd "$2" && pwd)") ;;
    *) die "unknown option $1; valid: --nodes --cpus --head-cpus --port --mlflow-port --host --dir --artifacts --isolate --hide" ;;
  esac
  shift 2
done
head_cpus=${head_cpus:-$cpus}
for v in nodes cpus port mlflow_port; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} must be a positive integer, got '${!v}'"
done
[[ $head_cpus =~ ^[0-9]+$ ]] || die "--head-cpus must be an integer >= 0, got '$head_cpus'"
if [[ $isolate == 1 ]]; then
  [[ $(id -u) == 0 ]] || die "--isolate needs root (it starts nodes with unshare --mount)"
  command -v unshare >/dev/null || die "--isolate needs unshare (util-linux)"
fi
[[ $cmd == up ]] && mkdir -p "$dir"
[[ -d $dir ]] && dir=$(cd "$dir" && pwd)
pids="$dir/pids"

# The project's tools: .venv/bin next to this script when there is one, else PATH.
checkout="$(cd "$(dirname "$0")/.." && pwd)"
venv="$checkout/.venv/bin"
[[ -x $venv/ray ]] && PATH="$venv:$PATH"
for tool in ray mlflow python; do command -v "$tool" >/dev/null || die "$tool not found: run make setup"; done

# A process group with a member that is not a zombie (orphans here may wait a while to be reaped).
running() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'; }

down() {
  [[ -f $pids ]] || { say "nothing to stop (no $pids)"; return 0; }
  local pgid left
  while read -r pgid _; do kill -TERM -- "-$pgid" 2>/dev/null || true; done <"$pids"
  # MLflow's server stops at once on SIGTERM. `ray start --block` stops its raylet, GCS and workers
  # gracefully, which took over 12 s even on an idle machine (the head's GCS outlives the nodes).
  # Past 2 s the rest is killed: a local cluster keeps nothing on disk worth the wait.
  for _ in $(seq 4); do
    left=0
    while read -r pgid _; do running "$pgid" && left=1; done <"$pids"
    [[ $left == 0 ]] && break
    sleep 0.5
  done
  while read -r pgid _; do kill -KILL -- "-$pgid" 2>/dev/null || true; done <"$pids"
  local temp; temp=$(cat "$dir/temp" 2>/dev/null || true)
  if [[ $temp == */genpipe-ray-* ]]; then
    # Ray's workers run in process groups of their own and exit once their raylet is gone: wait
    # for them (up to 5 s), then remove the sessions (sockets, Ray's own logs).
    for _ in $(seq 20); do pgrep -f -- "$temp" >/dev/null || break; sleep 0.25; done
    rm -rf "$temp"
  fi
  rm -f "$pids" "$dir/env" "$dir/temp" "$dir/conf"
  say "stopped"
}

if [[ $cmd == down ]]; then down; exit 0; fi

# An isolated node: `unshare` runs it in a mount namespace of its own where the checkout and each
# --hide DIR are an empty tmpfs; the checkout's .venv is bound back at its own path (its scripts
# name it), so the node has the environment and nothing else of the checkout.
isolated=(unshare --mount --propagation private -- bash -c '
  set -e
  checkout=$1; shift; hidden=(); while [[ $1 != -- ]]; do hidden+=("$1"); shift; done; shift
  keep=""
  if [[ -d $checkout/.venv ]]; then keep=$(mktemp -d); mount --bind "$checkout/.venv" "$keep"; fi
  for d in "$checkout" "${hidden[@]}"; do mount -t tmpfs -o size=1m,mode=0755 genpipe-hidden "$d"; done
  if [[ -n $keep ]]; then
    mkdir -p "$checkout/.venv"; mount --bind "$keep" "$checkout/.venv"; umount "$keep"; rmdir "$keep"
  fi
  cd /
  exec "$@"' isolated)

start() {  # start NAME CMD...: CMD in a new process group, output to DIR/NAME.log
  local name=$1; shift
  setsid "$@" >"$dir/$name.log" 2>&1 </dev/null &
  echo "$! $name" >>"$pids"
}

alive() { running "$(awk -v n="$1" '$2 == n {print $1}' "$pids")"; }

wait_for() {  # wait_for NAME SECONDS TEST...: until TEST succeeds, while NAME runs
  local name=$1 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    alive "$name" || { tail -n 20 "$dir/$name.log" >&2; die "$name exited during start-up (log: $dir/$name.log)"; }
    ((SECONDS < deadline)) || die "$name did not start in $2 s (log: $dir/$name.log)"
    sleep 0.5
  done
}

started() { grep -q "Ray runtime started" "$dir/$1.log"; }
healthy() { python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1"; }

node() {  # node NAME: a worker node joining the head, isolated when asked
  local name=$1 run=()
  [[ $isolate == 1 ]] && run=("${isolated[@]}" "$checkout" "${hide[@]}" --)
  start "$name" "${run[@]}" ray start --block --num-cpus "$cpus" --node-ip-address "$host" \
    --object-store-memory $((512 * 1024 * 1024)) --temp-dir "$temp/$name" --address "$host:$port"
}

listed() {  # listed N: wait until N nodes are alive; print each (id, address, CPUs) as a driver sees it
  RAY_ADDRESS="$host:$port" python - "$1" <<'EOF'
import sys, time
import ray
want = int(sys.argv[1])
ray.init(log_to_driver=False, logging_level="WARNING")
deadline = time.time() + 120
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < want and time.time() < deadline:
    time.sleep(0.5)
for n in alive:
    print(f"local-cluster: node {n['NodeID']} {n['NodeManagerAddress']} CPU={n['Resources'].get('CPU', 0):g}", file=sys.stderr)
sys.exit(0 if len(alive) >= want else 1)
EOF
}

if [[ $cmd == add ]]; then
  [[ -f $dir/conf ]] || die "no cluster in $dir (start one with: $0 up --dir $dir)"
  source "$dir/conf"  # host, port, cpus, temp, isolate, hide and RAY_AUTH_MODE of `up`
  export RAY_AUTH_MODE RAY_USAGE_STATS_ENABLED=0
  unset RAY_ADDRESS
  n=$(($(awk '$2 ~ /^node-/' "$pids" | wc -l) + 2))
  node "node-$n"
  wait_for "node-$n" 180 started "node-$n"
  live=0
  while read -r pgid name; do [[ $name != mlflow ]] && running "$pgid" && live=$((live + 1)); done <"$pids"
  listed "$live" || die "node-$n did not join (log: $dir/node-$n.log)"
  say "added node-$n (process group $(awk -v n="node-$n" '$2 == n {print $1}' "$pids"))"
  exit 0
fi

if [[ -f $pids ]]; then
  while read -r pgid _; do
    running "$pgid" && die "a cluster from $dir is up; stop it first: $0 down --dir $dir"
  done <"$pids"
  rm -f "$pids"  # left by a cluster that is gone (a reboot)
fi
# An explicit address never turns token authentication on by itself: head, nodes and every driver
# must agree, so the mode is set for all of them (a token in ~/.ray/auth_token, made if missing).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ $RAY_AUTH_MODE == token ]]; then ray get-auth-token --generate >/dev/null 2>&1 || die "ray get-auth-token failed"; fi
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS
# Each node gets a temp dir of its own: nodes sharing one would each forward every worker's output
# to the driver (each line twice), and one under /tmp/ray would be what every other `ray.init()` on
# this machine finds. Short, since Ray's Unix sockets live there (at most 107 bytes a path).
temp="${TMPDIR:-/tmp}/genpipe-ray-$port"
echo "$temp" >"$dir/temp"
declare -p host port cpus temp isolate hide RAY_AUTH_MODE >"$dir/conf"

# Anything that stops `up` half-way (an error, Ctrl-C) stops what it started.
trap '[[ ${ok:-} == 1 ]] || down' EXIT
# MLflow's job runner (GenAI evaluation jobs: seven more processes) is not needed for training runs.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow mlflow server --host "$host" --port "$mlflow_port" --workers 1 \
  --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "${artifacts:-$dir/mlartifacts}"
# 512 MiB of object store a node: Ray's default, 30% of the memory each, overcommits with several.
start head ray start --block --num-cpus "$head_cpus" --node-ip-address "$host" \
  --object-store-memory $((512 * 1024 * 1024)) --temp-dir "$temp/head" --head --port "$port" --include-dashboard=false
wait_for head 180 started head
for i in $(seq 2 "$nodes"); do node "node-$i"; done
for i in $(seq 2 "$nodes"); do wait_for "node-$i" 180 started "node-$i"; done
wait_for mlflow 180 healthy "http://$host:$mlflow_port/health"

cat >"$dir/env" <<EOF
export RAY_ADDRESS=$host:$port
export RAY_AUTH_MODE=$RAY_AUTH_MODE
export MLFLOW_TRACKING_URI=http://$host:$mlflow_port
EOF
listed "$nodes" || die "the cluster did not come up whole (logs: $dir/*.log)"
ok=1
say "up: $nodes nodes x $cpus CPUs$([[ $isolate == 1 ]] && echo ", isolated"), MLflow at http://$host:$mlflow_port; stop with: $0 down --dir $dir"
cat "$dir/env"
