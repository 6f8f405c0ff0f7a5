#!/usr/bin/env bash
# Installs what the end-to-end tests need beyond Cargo: a Python venv at
# <repo>/.venv with grpcio and grpcio-tools (tests/interop/requirements.txt),
# used by the grpcio interop tests (tests/tests/interop_grpcio.rs).
#
# Idempotent: reuses an existing venv, and pip skips what is already installed.
# PYTHON picks the interpreter that creates the venv (default: python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
requirements="$repo/tests/interop/requirements.txt"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv"
    "$python" -m venv "$venv"
fi

"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
"$venv/bin/python" -c 'import grpc, grpc_tools; print("grpcio", grpc.__version__, "ready in '"$venv"'")'
