#!/usr/bin/env bash
# Meshwire, two hops, the sidecar-mesh shape (like the rig's envoy-mesh.sh):
#   loadgen -> client sidecar (LISTEN_PORT) -> per-call least-request over
#   one server sidecar per backend (like one sidecar per pod) -> its backend.
# All sidecars share PROXY_CPUS; prints "CLIENT_PID SERVER_PIDS...".
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The sidecar-to-sidecar hop is mutual TLS 1.3, as in envoy-mesh.sh: a
# throwaway CA and certificates made now (MESHWIRE_MESH_TLS=0: plaintext h2c).
# MESHWIRE_MESH_EXTRA_ARGS passes extra flags to every sidecar.
extra=(${MESHWIRE_MESH_EXTRA_ARGS:-})
tls=${MESHWIRE_MESH_TLS:-1}
server_tls=() client_tls=() identity=""
if [[ $tls == 1 ]]; then
  pki="$RIG_RUN_DIR/meshwire-pki"
  BENCH_BIN=${MESHWIRE_BENCH_BIN:-$REPO/target/release/meshwire-bench}
  if [[ ! -x $BENCH_BIN ]]; then
    (cd "$REPO" && cargo build --release -q -p meshwire-examples --bin meshwire-bench) >&2 || die "build failed"
  fi
  "$BENCH_BIN" --write-pki "$pki" >&2 || die "cannot write certificates"
  server_tls=(--cert "$pki/echo.crt" --key "$pki/echo.key" --trust-bundle "$pki/bundle.pem")
  client_tls=(--cert "$pki/client.crt" --key "$pki/client.key" --trust-bundle "$pki/bundle.pem")
  identity="spiffe://bench.local/ns/default/sa/echo"
fi

pids=()
inbound=()
for i in "${!BACKENDS[@]}"; do
  port=$(free_port)
  start_sidecar "server-$i" --app "127.0.0.1:${BACKENDS[$i]}" --inbound "127.0.0.1:$port" \
    --outbound "127.0.0.1:$(free_port)" "${server_tls[@]}" "${extra[@]}"
  ready_or_die "$STARTED_PID" "$port" "server-$i"
  pids+=("$STARTED_PID")
  inbound+=("$port")
done

cfg="$RIG_RUN_DIR/meshwire-mesh.yaml"
{
  echo "services:"
  echo "  - name: echo"
  echo "    listen: 127.0.0.1:$LISTEN_PORT"
  echo "    endpoints:"
  for p in "${inbound[@]}"; do
    echo "      - address: 127.0.0.1:$p"
    if [[ -n $identity ]]; then echo "        identity: $identity"; fi
  done
} >"$cfg"
start_sidecar client --static-config "$cfg" --outbound "127.0.0.1:$(free_port)" "${client_tls[@]}" "${extra[@]}"
cpid=$STARTED_PID
ready_or_die "$cpid" "$LISTEN_PORT" client
echo "$cpid ${pids[*]}"
