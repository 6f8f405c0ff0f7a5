# Shared by the Meshwire launchers for ../shared/bench-peers (sourced).
# Follows the rig's launcher contract (bench-peers/proxies/common.sh):
#   LAUNCHER LISTEN_PORT BACKEND_PORT [BACKEND_PORT...]
#   env RIG_RUN_DIR, PROXY_CPUS, PROXY_WORKERS
# prints the PIDs to measure as the last line of stdout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
: "${RIG_RUN_DIR:=$(mktemp -d "${TMPDIR:-/tmp}/meshwire-rig.XXXXXX")}"
mkdir -p "$RIG_RUN_DIR"
: "${PROXY_CPUS:=}"
: "${PROXY_WORKERS:=1}"
MESHWIRE_BIN=${MESHWIRE_BIN:-$REPO/target/release/meshwire-sidecar}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

[[ $# -ge 2 ]] || die "usage: $(basename "$0") LISTEN_PORT BACKEND_PORT [BACKEND_PORT...]"
LISTEN_PORT=$1; shift
BACKENDS=("$@")

if [[ ! -x $MESHWIRE_BIN ]]; then
  (cd "$REPO" && cargo build --release -q -p meshwire-sidecar) >&2 || die "build failed"
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local port=$1 i
  for ((i = 0; i < 300; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  return 1
}

# start_sidecar NAME ARGS...: starts a sidecar (pinned to PROXY_CPUS) with its
# log in RIG_RUN_DIR/NAME.log; sets STARTED_PID.
start_sidecar() {
  local name=$1; shift
  local cmd=("$MESHWIRE_BIN" --workers "$PROXY_WORKERS" --admin 127.0.0.1:0 --log warn "$@")
  if [[ -n $PROXY_CPUS ]]; then cmd=(taskset -c "$PROXY_CPUS" "${cmd[@]}"); fi
  "${cmd[@]}" >"$RIG_RUN_DIR/$name.log" 2>&1 </dev/null &
  STARTED_PID=$!
}

ready_or_die() { # PID PORT NAME
  if ! wait_port "$2" || ! kill -0 "$1" 2>/dev/null; then
    kill "$1" 2>/dev/null || true
    tail -n 30 "$RIG_RUN_DIR/$3.log" >&2 || true
    die "$3 did not come up on port $2"
  fi
}
