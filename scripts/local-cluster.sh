#!/usr/bin/env bash
# A Ray cluster and an MLflow tracking server as separate processes on this machine: the way a
# cluster runs, to try scale-out before renting one.
#
#   scripts/local-cluster.sh up [--nodes N] [--cpus N] [--port P] [--mlflow-port P] [--host IP] [--dir DIR]
#   source .genpipe/cluster/env            # RAY_ADDRESS, RAY_AUTH_MODE, MLFLOW_TRACKING_URI
#   .venv/bin/genpipe exp run -S train.num_workers=2 train_evaluator   # one worker per node
#   scripts/local-cluster.sh down [--dir DIR]
#
# `up` starts a head (`ray start --head --block`), N-1 more nodes (`ray start --address --block`),
# each with --cpus CPUs, and `mlflow server` (SQLite and artefacts in DIR), each in its own process
# group; it waits until all N nodes are alive and the server answers, then writes DIR/env and prints
# the node ids. `down` signals those process groups: never `ray stop`, which stops every Ray
# instance on the machine, other users' included. Logs: DIR/*.log.
set -euo pipefail

usage() { sed -n '5,8p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }
say() { echo "local-cluster: $*" >&2; }

cmd="${1:-}"; [[ $cmd == up || $cmd == down ]] || usage; shift
nodes=2 cpus=1 port=6379 mlflow_port=5000 host=127.0.0.1 dir=.genpipe/cluster
while [[ $# -gt 0 ]]; do
  [[ $# -ge 2 ]] || die "$1 needs a value"
  case "$1" in
    --nodes) nodes=$2 ;; --cpus) cpus=$2 ;; --port) port=$2 ;; --mlflow-port) mlflow_port=$2 ;;
    --host) host=$2 ;; --dir) dir=$2 ;;
    *) die "unknown option $1; valid: --nodes --cpus --port --mlflow-port --host --dir" ;;
  esac
  shift 2
done
for v in nodes cpus port mlflow_port; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} must be a positive integer, got '${!v}'"
done
[[ $cmd == up ]] && mkdir -p "$dir"
[[ -d $dir ]] && dir=$(cd "$dir" && pwd)
pids="$dir/pids"

# The project's tools: .venv/bin next to this script when there is one, else PATH.
venv="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
[[ -x $venv/ray ]] && PATH="$venv:$PATH"
for tool in ray mlflow python; do command -v "$tool" >/dev/null || die "$tool not found: run make setup"; done

# A process group with a member that is not a zombie (orphans here may wait a while to be reaped).
running() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'; }

down() {
  [[ -f $pids ]] || { say "nothing to stop (no $pids)"; return 0; }
  local pgid left
  while read -r pgid _; do kill -TERM -- "-$pgid" 2>/dev/null || true; done <"$pids"
  # `ray start --block` stops its raylet, GCS and workers on SIGTERM, gracefully: up to 25 s on a
  # busy machine. Past 10 s the rest is killed; a cluster keeps nothing on disk worth the wait.
  for _ in $(seq 20); do
    left=0
    while read -r pgid _; do running "$pgid" && left=1; done <"$pids"
    [[ $left == 0 ]] && break
    sleep 0.5
  done
  while read -r pgid _; do kill -KILL -- "-$pgid" 2>/dev/null || true; done <"$pids"
  local temp; temp=$(cat "$dir/temp" 2>/dev/null || true)
  [[ $temp == */genpipe-ray-* ]] && rm -rf "$temp"  # Ray's sessions: sockets, its own logs
  rm -f "$pids" "$dir/env" "$dir/temp"
  say "stopped"
}

if [[ $cmd == down ]]; then down; exit 0; fi

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

# Anything that stops `up` half-way (an error, Ctrl-C) stops what it started.
trap '[[ ${ok:-} == 1 ]] || down' EXIT
# 512 MiB of object store a node: Ray's default, 30% of the memory each, overcommits with several.
ray_node=(ray start --block --num-cpus "$cpus" --node-ip-address "$host"
  --object-store-memory $((512 * 1024 * 1024)))
# MLflow's job runner (GenAI evaluation jobs: seven more processes) is not needed for training runs.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start mlflow mlflow server --host "$host" --port "$mlflow_port" --workers 1 \
  --backend-store-uri "sqlite:///$dir/mlflow.db" --artifacts-destination "$dir/mlartifacts"
start head "${ray_node[@]}" --temp-dir "$temp/head" --head --port "$port" --include-dashboard=false
wait_for head 180 started head
for i in $(seq 2 "$nodes"); do start "node-$i" "${ray_node[@]}" --temp-dir "$temp/$i" --address "$host:$port"; done
for i in $(seq 2 "$nodes"); do wait_for "node-$i" 180 started "node-$i"; done
wait_for mlflow 180 healthy "http://$host:$mlflow_port/health"

cat >"$dir/env" <<EOF
export RAY_ADDRESS=$host:$port
export RAY_AUTH_MODE=$RAY_AUTH_MODE
export MLFLOW_TRACKING_URI=http://$host:$mlflow_port
EOF
# Every node registered: list them (id, address, CPUs) as a driver of the new cluster sees them.
RAY_ADDRESS="$host:$port" python - "$nodes" <<'EOF' || die "the cluster did not come up whole (logs: $dir/*.log)"
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
ok=1
say "up: $nodes nodes x $cpus CPUs, MLflow at http://$host:$mlflow_port; stop with: $0 down --dir $dir"
cat "$dir/env"
