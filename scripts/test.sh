#!/usr/bin/env bash
# Runs the whole test suite: unit, conformance, SDK doc tests, and end-to-end
# tests that start the real `conflux` binary. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "==> formatting"
cargo fmt --all --check
echo "==> conflux-client links none of the daemon"
# The API client (used by the CLI, conflux-bench and the tests) must stay
# light: no wasmtime, openraft or sled in its normal dependencies.
if cargo tree -p conflux-client -e normal | grep -E 'wasmtime|openraft|sled'; then
    echo "conflux-client depends on a daemon crate (above)" >&2
    exit 1
fi
echo "==> TypeScript and Python SDKs: native tests, then their components (target/polyglot), in the background"
# Independent of cargo and of each other, and mostly single-threaded: they
# run beside the Rust builds below, which leave a core idle in their serial
# phases. Their output is shown once they are done.
mkdir -p target/polyglot
scripts/build-ts.sh >target/polyglot/build-ts.log 2>&1 & ts=$!
scripts/build-python.sh >target/polyglot/build-python.log 2>&1 & py=$!
echo "==> building guest components (wasm32-wasip2)"
CARGO_TARGET_DIR=target/guests cargo build --release --target wasm32-wasip2 \
    -p counter -p team -p faulty -p escape -p no-handler -p unknown-imports \
    -p counter-v2 -p tally-v1 -p tally-v2 -p relay -p asker -p bank -p lock -p blob -p raw-waits
# Apart: team-joiner uses team's typed client, building team as a dependency
# with feature `client` (no handler export) into a component of the same file
# name as team's own (tests/support's guest_target_dir).
CARGO_TARGET_DIR=target/guests-clients cargo build --release --target wasm32-wasip2 -p team-joiner
echo "==> building everything, benchmarks and bench tools included (built, not run: they are not tests)"
# One package selection for every host build: cargo unifies features per
# selection, so `-p` subsets would each compile their own wasmtime. The
# side-by-side suite (`cargo xtask bench-peers`) needs PostgreSQL, Node.js and
# minutes of quiet machine: CI only makes sure it builds.
cargo build --workspace --all-targets
echo "==> TypeScript and Python SDKs (started above)"
ts_rc=0; py_rc=0
wait $ts || ts_rc=$?
wait $py || py_rc=$?
cat target/polyglot/build-ts.log target/polyglot/build-python.log
if [ $ts_rc -ne 0 ] || [ $py_rc -ne 0 ]; then
    echo "the TypeScript ($ts_rc) or Python ($py_rc) SDK build failed (above)" >&2
    exit 1
fi
echo "==> tests"
cargo test --workspace "$@"
