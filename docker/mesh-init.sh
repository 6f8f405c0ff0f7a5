#!/bin/sh
# The init step of docker-compose.yml (service `mesh-init`): runs after the
# control plane and the app containers are healthy and before any sidecar
# starts (and again on every `docker compose up`). It registers every instance
# of the example service with the control plane (what a Kubernetes controller
# or a deploy script would do) and hands each sidecar what it needs to join
# the mesh: the trust bundle and a single-use join token, in the `bootstrap`
# volume the sidecars mount read-only at /bootstrap.
#
# Environment: MESHCTL_SERVER and MESHWIRE_DATA_DIR (the control plane and
# its data directory, mounted read-only for admin.token), MESH_SERVICE,
# MESH_INSTANCES (host names of the instances' app containers, whose network
# namespace their sidecars share), MESH_INBOUND_PORT (the sidecars' inbound),
# MESH_CLIENTS (name=service of each client-only sidecar, e.g. loadgen=loadgen),
# MESH_BOOTSTRAP (where the bundle and tokens go), MESH_TOKEN_TTL.
#
# POSIX sh with meshctl and getent only: the runtime image has nothing else.
set -eu

service="${MESH_SERVICE:-echo}"
instances="${MESH_INSTANCES:-echo-0 echo-1 echo-2}"
port="${MESH_INBOUND_PORT:-15006}"
clients="${MESH_CLIENTS:-loadgen=loadgen}"
bootstrap="${MESH_BOOTSTRAP:-/bootstrap}"
token_ttl="${MESH_TOKEN_TTL:-1h}"

say() { echo "mesh-init: $*"; }

# Idempotent: `docker compose up` may run this again on the same data.
if ! meshctl service get "$service" >/dev/null 2>&1; then
    meshctl service create "$service" --request-timeout 5s
fi
# A join token names an existing service: the clients' services too.
for pair in $clients; do
    svc="${pair#*=}"
    if ! meshctl service get "$svc" >/dev/null 2>&1; then
        meshctl service create "$svc"
    fi
done

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

# === identity: the trust bundle and one join token per sidecar ===
# Tokens are single-use, so every run writes fresh ones: a sidecar started
# again (`docker compose up -d` after a stop) joins with a new token, while
# running sidecars keep the certificates they have (and renew them over mTLS).
# The sidecars start only after this step has finished, and running ones do
# not read these files again, so plain writes suffice (the image has no mv).
umask 077
bundle=$(meshctl ca bundle)
printf '%s\n' "$bundle" >"$bootstrap/trust-bundle.pem"
say "trust bundle -> $bootstrap/trust-bundle.pem"
for pair in $(for n in $instances; do echo "$n=$service"; done) $clients; do
    name="${pair%%=*}"
    svc="${pair#*=}"
    token=$(meshctl token create --service "$svc" --ttl "$token_ttl")
    printf '%s\n' "$token" >"$bootstrap/$name.token"
    say "join token for $name (service $svc, valid $token_ttl) -> $bootstrap/$name.token"
done

say "done; the endpoints of $service:"
meshctl endpoint list "$service"
