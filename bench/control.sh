#!/usr/bin/env bash
# The control plane at scale (not run in CI; see bench/README.md): the
# release `tandem control` with N simulated proxies holding real Discovery
# streams (TLS, join tokens, ACKs), for each N in $PROXIES. Prints a
# markdown table and writes it to bench/work/control.md.
#
#   bash bench/control.sh
#   PROXIES=1000 SERVICES=100 bash bench/control.sh
#   REPLICAS=2 bash bench/control.sh     # replicas sharing a 3-member etcd
set -euo pipefail
cd "$(dirname "$0")/.."
PROXIES="${PROXIES:-100,250,500,1000}"
SERVICES="${SERVICES:-50}"
REPLICAS="${REPLICAS:-0}"
TARGET="${CARGO_TARGET_DIR:-target}"
TANDEM_BIN="${TANDEM_BIN:-$TARGET/release/tandem}"
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --release --bin tandem -p tandem
fi
cargo build --release -p tandem-e2e --example bench-control
mkdir -p bench/work
# Each simulated proxy holds one connection: the tool needs an fd each.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
TANDEM_BIN="$(realpath "$TANDEM_BIN")" "$TARGET/release/examples/bench-control" \
  --proxies "$PROXIES" --services "$SERVICES" --replicas "$REPLICAS" --markdown bench/work/control.md
