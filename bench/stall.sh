#!/usr/bin/env bash
# Memory under stalled clients (not run in CI; see bench/README.md): the
# release `tandem` as a client and a web sidecar in front of the demo app,
# N HTTP/2 streams that never open their flow-control window, then how
# long each sidecar's RSS takes to come back once they close. Prints a
# markdown table and writes it to bench/work/stall.md.
#
#   bash bench/stall.sh
#   STREAMS=2000 bash bench/stall.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS="${STREAMS:-1000}"
TARGET="${CARGO_TARGET_DIR:-target}"
TANDEM_BIN="${TANDEM_BIN:-$TARGET/release/tandem}"
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --release --bin tandem -p tandem
fi
cargo build --release -p tandem-e2e --example bench-stall
mkdir -p bench/work
# Each stream's connections need file descriptors on both sidecars.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
TANDEM_BIN="$(realpath "$TANDEM_BIN")" "$TARGET/release/examples/bench-stall" \
  --streams "$STREAMS" --markdown bench/work/stall.md
