#!/usr/bin/env bash
# Builds the standard policies (policies/*) into WebAssembly components in plugins/.
# Usage: scripts/build-policies.sh [ROUTER_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
router=${1:-$target/release/switchyard}
policies=(round-robin weighted-round-robin least-request consistent-hash fallback canary geo)

rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
args=()
for p in "${policies[@]}"; do args+=(-p "policy-$p"); done
echo "building policies: ${policies[*]}"
cargo build --release --target wasm32-unknown-unknown "${args[@]}"
[ "$router" != "$target/release/switchyard" ] || cargo build --release -p switchyard
mkdir -p plugins
for p in "${policies[@]}"; do
  # Publish the way the router expects: a hidden temp name, then an atomic rename.
  "$router" plugin componentize "$target/wasm32-unknown-unknown/release/policy_${p//-/_}.wasm" -o "plugins/.$p.wasm.tmp"
  mv "plugins/.$p.wasm.tmp" "plugins/$p.wasm"
  echo "  plugins/$p.wasm ($(stat -c %s "plugins/$p.wasm") bytes)"
done
