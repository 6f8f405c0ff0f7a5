#!/bin/sh
# The init step of docker-compose.yml (service `mesh-init`): runs once, after
# the control plane and the app containers are healthy and before any
# sidecar starts. It registers every instance of the example service with the
# control plane (what a Kubernetes controller or a deploy script would do).
#
# Environment: MESHCTL_SERVER and MESHWIRE_DATA_DIR (the control plane and
# its data directory, mounted read-only for admin.token), MESH_SERVICE,
# MESH_INSTANCES (host names of the instances' app containers, whose network
# namespace their sidecars share), MESH_INBOUND_PORT (the sidecars' inbound).
#
# POSIX sh with meshctl and getent only: the runtime image has nothing else.
set -eu

service="${MESH_SERVICE:-echo}"
instances="${MESH_INSTANCES:-echo-0 echo-1 echo-2}"
port="${MESH_INBOUND_PORT:-15006}"

say() { echo "mesh-init: $*"; }

# Idempotent: `docker compose up` may run this again on the same data.
if ! meshctl service get "$service" >/dev/null 2>&1; then
    meshctl service create "$service" --request-timeout 5s
fi

for name in $instances; do
    # shellcheck disable=SC2046 # word splitting picks the first address
    set -- $(getent ahostsv4 "$name" || true)
    if [ "$#" -eq 0 ]; then
        say "cannot resolve $name" >&2
        exit 1
    fi
    addr="$1:$port"
    if out=$(meshctl endpoint add "$service" "$addr" --meta "instance=$name" 2>&1); then
        say "$out"
    else
        case "$out" in
            *ALREADY_EXISTS*) say "$name ($addr) already registered" ;;
            *) say "$out" >&2; exit 1 ;;
        esac
    fi
done

# === identity hook (join tokens + trust bundle) ===========================
# When mTLS lands, this is the one place that hands each sidecar what it
# needs to get its certificate; the sidecars mount the `bootstrap` volume
# read-only at /bootstrap (see "identity hook" in docker-compose.yml):
#
#   meshctl ca bundle > /bootstrap/trust-bundle.pem        # (exact command: see the identity issue)
#   for name in $instances loadgen; do
#       svc="$service"; [ "$name" = loadgen ] && svc=loadgen
#       meshctl token create --service "$svc" --ttl 10m > "/bootstrap/$name.token"
#   done
#
# and `meshctl endpoint add` above gains `--identity <the SPIFFE ID of $service>`.
# ==========================================================================

say "done; the endpoints of $service:"
meshctl endpoint list "$service"
