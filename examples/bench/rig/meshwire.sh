#!/usr/bin/env bash
# Meshwire, one hop: the rig's loadgen -> one sidecar (per-service listener on
# LISTEN_PORT, since the loadgen's :authority is an IP) -> weighted
# least-request over the h2c backends.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

cfg="$RIG_RUN_DIR/meshwire.yaml"
{
  echo "services:"
  echo "  - name: echo"
  echo "    listen: 127.0.0.1:$LISTEN_PORT"
  echo "    endpoints:"
  for p in "${BACKENDS[@]}"; do echo "      - address: 127.0.0.1:$p"; done
} >"$cfg"

start_sidecar meshwire --static-config "$cfg" --outbound "127.0.0.1:$(free_port)"
pid=$STARTED_PID
ready_or_die "$pid" "$LISTEN_PORT" meshwire
echo "$pid"
