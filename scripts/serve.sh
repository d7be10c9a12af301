#!/usr/bin/env bash
# Builds the router and the standard policies, then starts the router with
# examples/switchyard.toml (or the config given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-examples/switchyard.toml}
cargo build --release -p switchyard
scripts/build-policies.sh target/release/switchyard
exec target/release/switchyard serve --config "$config"
