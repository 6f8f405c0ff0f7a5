#!/usr/bin/env bash
# The test command (see README.md): installs what the tests need on a fresh
# machine, then checks formatting, lints and runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/setup-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
