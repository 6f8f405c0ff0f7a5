#!/usr/bin/env bash
# Meshwire, two hops, the sidecar-mesh shape (like the rig's envoy-mesh.sh):
#   loadgen -> client sidecar (LISTEN_PORT) -> per-call least-request over
#   one server sidecar per backend (like one sidecar per pod) -> its backend.
# All sidecars share PROXY_CPUS; prints "CLIENT_PID SERVER_PIDS...".
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The hop is HTTP/2 in cleartext until the identity issue brings mTLS;
# set MESHWIRE_MESH_EXTRA_ARGS to pass extra flags to every sidecar.
extra=(${MESHWIRE_MESH_EXTRA_ARGS:-})

pids=()
inbound=()
for i in "${!BACKENDS[@]}"; do
  port=$(free_port)
  start_sidecar "server-$i" --app "127.0.0.1:${BACKENDS[$i]}" --inbound "127.0.0.1:$port" \
    --outbound "127.0.0.1:$(free_port)" "${extra[@]}"
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
  for p in "${inbound[@]}"; do echo "      - address: 127.0.0.1:$p"; done
} >"$cfg"
start_sidecar client --static-config "$cfg" --outbound "127.0.0.1:$(free_port)" "${extra[@]}"
cpid=$STARTED_PID
ready_or_die "$cpid" "$LISTEN_PORT" client
echo "$cpid ${pids[*]}"
