#!/usr/bin/env bash
# The whole local stack: builds the router, the shard server and the standard policies,
# then starts the router with examples/switchyard.toml (or the config given), which
# fetches the model if missing and runs two supervised replicas of it.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-examples/switchyard.toml}
cargo build --release -p switchyard -p switchyard-shard
scripts/build-policies.sh target/release/switchyard
exec target/release/switchyard serve --config "$config"
