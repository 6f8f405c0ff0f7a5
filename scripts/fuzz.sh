#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS (default 60),
# or only the targets named after it, from the checked-in seed corpus
# (fuzz/corpus/<target>/; new inputs go to a scratch copy, not the repo).
# Crashes land in fuzz/artifacts/<target>/; the script fails if any target
# crashed. CI runs it with a few seconds so the harnesses keep building.
#
#   scripts/fuzz.sh 3600                  # an hour per target
#   scripts/fuzz.sh 60 grpc_timeout       # one target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and libFuzzer's nightly
# flags: on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    cp -r "corpus/$t/." "$scratch/$t/" 2>/dev/null || true
    echo "== $t: ${secs}s"
    # Debug assertions on: arithmetic overflow is a finding too.
    if ! cargo fuzz run --debug-assertions "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "== $t: CRASHED (see fuzz/artifacts/$t/)"
        failed=1
    fi
done
exit "$failed"
