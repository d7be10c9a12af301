#!/usr/bin/env bash
# Benchmark of the shard server (switchyard-shard): single-stream tokens/s at 1, 2 and 3
# pipeline stages against the single-process candle reference, aggregate tokens/s of 1, 4
# and 8 concurrent streams against sequential requests, and time to ready, per weight format.
#
#   bash bench/shard.sh                         # about 5 minutes after the build
#   FORMATS=fused TOKENS=128 bash bench/shard.sh
#
# Builds switchyard-shard and the benchmark (bench/shard/main.rs, the `shard` bench target
# of host/shard) in release mode, fetches the model if it is missing, runs
# `shard run`, prints a markdown report and writes it to bench/results/shard-<timestamp>.md
# (git-ignored). See bench/README.md.
set -euo pipefail

FORMATS="${FORMATS:-fused-q8,fused,native}"
TOKENS="${TOKENS:-64}"              # completion tokens per request (ignore_eos: exactly this many)
SHARDS="${SHARDS:-1,2,3}"           # pipeline stages for the single-stream runs
STREAMS="${STREAMS:-1,4,8}"         # concurrent streams (1-stage replica)
REPEAT="${REPEAT:-2}"               # single-stream repetitions (the best counts)
SERVE_ARGS="${SERVE_ARGS:-}"        # extra `switchyard-shard serve` arguments, e.g. "--threads 2"
QUIET_BUSY_PCT="${QUIET_BUSY_PCT:-15}" # before each measurement, wait while other processes use more than this % ...
QUIET_TIMEOUT="${QUIET_TIMEOUT:-180}"  # ... but at most this many seconds

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
MODEL="${MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
RESULTS_DIR="$ROOT/bench/results"
STAMP="$(date +%Y%m%d-%H%M%S)"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ ! -f "$MODEL" ]; then
    log "fetching the model"
    scripts/fetch-model.sh "$(dirname "$MODEL")"
fi

log "building switchyard-shard and the benchmark (release)"
cargo build --release -q -p switchyard-shard
# The bench profile inherits release: this reuses the dependencies built above.
cargo bench -q -p switchyard-shard --bench shard --no-run

mkdir -p "$RESULTS_DIR"
OUT="$RESULTS_DIR/shard-$STAMP.md"
log "running (report: $OUT)"
cargo bench -q -p switchyard-shard --bench shard -- run \
    --bin "$TARGET_DIR/release/switchyard-shard" \
    --model "$MODEL" \
    --formats "$FORMATS" \
    --tokens "$TOKENS" \
    --shards "$SHARDS" \
    --streams "$STREAMS" \
    --repeat "$REPEAT" \
    --serve-args="$SERVE_ARGS" \
    --quiet-busy-pct "$QUIET_BUSY_PCT" \
    --quiet-timeout "$QUIET_TIMEOUT" \
    --out "$OUT"
