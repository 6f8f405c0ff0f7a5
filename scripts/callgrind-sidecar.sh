#!/usr/bin/env bash
# Instructions per call through a sidecar pair, counted by callgrind (immune
# to the machine's load, unlike rps/CPU figures).
#
#   scripts/callgrind-sidecar.sh [BIN_DIR] [CALLS]
#
# BIN_DIR holds release builds of meshwire-sidecar, meshwire-load and
# echo-server (default target/release: `cargo build --release -p
# meshwire-sidecar -p meshwire-examples --bin meshwire-sidecar --bin
# meshwire-load --bin echo-server`). Runs echo-server, a server sidecar
# (inbound → echo) and a client sidecar (outbound → the server sidecar), both
# plaintext, one worker each, under `valgrind --tool=callgrind`, and sends
# CALLS and then 2×CALLS unary calls (16 in flight, each with a deadline, so
# grpc-timeout is forwarded). Per call = (Ir(2×CALLS) − Ir(CALLS)) / CALLS,
# which cancels start-up and shutdown.
set -euo pipefail
BIN=${1:-target/release}
CALLS=${2:-2000}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 1 600); do curl -fs "http://$1/ready" >/dev/null && return 0; sleep 0.1; done; echo "not ready: $1" >&2; return 1; }

run() { # $1 = calls; prints "client_ir server_ir"
  local ECHO=$(port) S_IN=$(port) S_OUT=$(port) S_ADM=$(port) C_OUT=$(port) C_ADM=$(port)
  "$BIN/echo-server" --listen 127.0.0.1:$ECHO --name echo >/dev/null 2>&1 &
  local echo_pid=$!
  cat >"$WORK/client.yaml" <<YAML
services:
  - name: echo
    endpoints:
      - address: 127.0.0.1:$S_IN
YAML
  valgrind --tool=callgrind --callgrind-out-file="$WORK/server.out" \
    "$BIN/meshwire-sidecar" --workers 1 --log warn --app 127.0.0.1:$ECHO \
    --inbound 127.0.0.1:$S_IN --outbound 127.0.0.1:$S_OUT --admin 127.0.0.1:$S_ADM 2>"$WORK/server.log" &
  local server_pid=$!
  valgrind --tool=callgrind --callgrind-out-file="$WORK/client.out" \
    "$BIN/meshwire-sidecar" --workers 1 --log warn --static-config "$WORK/client.yaml" \
    --inbound 127.0.0.1:0 --outbound 127.0.0.1:$C_OUT --admin 127.0.0.1:$C_ADM 2>"$WORK/client.log" &
  local client_pid=$!
  wait_ready 127.0.0.1:$S_ADM; wait_ready 127.0.0.1:$C_ADM
  "$BIN/meshwire-load" --sidecar 127.0.0.1:$C_OUT --service echo --concurrency 16 \
    --timeout 30s --calls "$1" --format json | tail -1 >"$WORK/load.json"
  kill -TERM $client_pid $server_pid; wait $client_pid $server_pid || true
  kill $echo_pid; wait $echo_pid 2>/dev/null || true
  python3 - "$WORK/load.json" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
assert s["calls"] == int(sys.argv[2]) and not s["errors"], s
PY
  local c s
  c=$(grep -m1 '^summary:' "$WORK/client.out" | awk '{print $2}')
  s=$(grep -m1 '^summary:' "$WORK/server.out" | awk '{print $2}')
  echo "$c $s"
}

read -r c1 s1 < <(run "$CALLS")
read -r c2 s2 < <(run $((2 * CALLS)))
echo "client sidecar (outbound): $(( (c2 - c1) / CALLS )) instructions/call"
echo "server sidecar (inbound):  $(( (s2 - s1) / CALLS )) instructions/call"
