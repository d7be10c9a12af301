#!/usr/bin/env bash
# Router added latency with a WebAssembly balancer against the native default, at the
# same fixed request rate, in one run:
#   direct   : loadgen → upstream
#   native   : loadgen → router (native P2C) → upstreams
#   wasm     : loadgen → router (plugin least-request) → upstreams
# Usage: bash bench/policy-latency.sh      (RATE, DURATION, WARMUP, ROUNDS env overrides)
set -euo pipefail
RATE=${RATE:-2000}; DURATION=${DURATION:-15}; WARMUP=${WARMUP:-3}; ROUNDS=${ROUNDS:-3}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"; cd "$ROOT"
TMP=$(mktemp -d /tmp/switchyard-policy-bench.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

cargo build --release -q -p switchyard -p switchyard-loadgen
T="${CARGO_TARGET_DIR:-target}"
scripts/build-policies.sh "$T/release/switchyard" >/dev/null
LOADGEN=$T/release/loadgen; ROUTER=$T/release/switchyard

start() { # start NAME CMD... ; waits for "listening on http://ADDR" and sets ADDR_<NAME>
  local name=$1; shift
  "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" & pids+=($!)
  for _ in $(seq 200); do
    local a; a=$(grep -m1 -o '^listening on http://[0-9.:]*' "$TMP/$name.out" 2>/dev/null | sed 's|listening on http://||') || true
    if [ -n "$a" ]; then printf -v "ADDR_$name" '%s' "$a"; return; fi
    sleep 0.05
  done
  echo "$name did not start: $(cat "$TMP/$name.err")" >&2; exit 1
}

start up1 "$LOADGEN" upstream --listen 127.0.0.1:0
start up2 "$LOADGEN" upstream --listen 127.0.0.1:0
for kind in native wasm; do
  policy=""; [ $kind = wasm ] && policy='policy = { balance = "least-request" }'
  cat >"$TMP/$kind.toml" <<TOML
[admin]
enabled = false
[[listeners]]
addr = "127.0.0.1:0"
[plugins]
dir = "$ROOT/plugins"
cache_dir = "$TMP/cache"
[[models]]
name = "bench"
$policy
[[models.endpoints]]
url = "http://$ADDR_up1"
[[models.endpoints]]
url = "http://$ADDR_up2"
TOML
  start "$kind" "$ROUTER" serve --config "$TMP/$kind.toml"
done
sleep 1
curl -sf "http://$ADDR_wasm/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model":"bench","messages":[]}' >/dev/null || { echo "wasm router not answering" >&2; exit 1; }

run() { "$LOADGEN" rate --url "http://$1/v1/chat/completions" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" --json; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])['$2'])" "$1"; }

echo "| round | direct p50/p99 µs | native added p50/p99 µs | wasm added p50/p99 µs |"
echo "|---|---|---|---|"
sum_n=0; sum_w=0
for r in $(seq "$ROUNDS"); do
  # Interleave targets within a round so drift on a shared machine hits all three alike.
  d=$(run "$ADDR_up1"); n=$(run "$ADDR_native"); w=$(run "$ADDR_wasm")
  for j in "$n" "$w"; do
    [ "$(field "$j" errors)" = 0 ] && [ "$(field "$j" non_2xx)" = 0 ] || { echo "errors in run: $j" >&2; exit 1; }
  done
  d50=$(field "$d" p50_us); d99=$(field "$d" p99_us)
  n50=$(( $(field "$n" p50_us) - d50 )); n99=$(( $(field "$n" p99_us) - d99 ))
  w50=$(( $(field "$w" p50_us) - d50 )); w99=$(( $(field "$w" p99_us) - d99 ))
  echo "| $r | $d50 / $d99 | $n50 / $n99 | $w50 / $w99 |"
  sum_n=$((sum_n + n50)); sum_w=$((sum_w + w50))
done
python3 - "$sum_n" "$sum_w" <<'PY'
import sys
n, w = int(sys.argv[1]), int(sys.argv[2])
ratio = w / n if n > 0 else float("nan")
print(f"\nadded p50, summed over rounds: native {n} µs, wasm {w} µs → wasm/native = {ratio:.2f} "
      f"(target ≤ 1.10: {'PASS' if ratio <= 1.10 else 'MISS'})")
PY
