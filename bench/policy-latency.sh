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

start() { # start NAME CMD... ; waits for "listening on http://ADDR", sets ADDR_<NAME> and PID_<NAME>
  local name=$1; shift
  "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" & pids+=($!)
  printf -v "PID_$name" '%s' "$!"
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
cpu_ms() { awk '{print ($14 + $15) * 10}' "/proc/$1/stat"; }   # utime + stime, 100 Hz ticks
# run_router KIND: one load run against that router; sets P50_KIND, P99_KIND, CPU_KIND (µs
# of router CPU per request, warm-up included).
run_router() {
  local kind=$1 addr pid c0 j
  eval "addr=\$ADDR_$kind; pid=\$PID_$kind"
  c0=$(cpu_ms "$pid"); j=$(run "$addr")
  [ "$(field "$j" errors)" = 0 ] && [ "$(field "$j" non_2xx)" = 0 ] || { echo "errors in run: $j" >&2; exit 1; }
  printf -v "P50_$kind" '%s' "$(field "$j" p50_us)"; printf -v "P99_$kind" '%s' "$(field "$j" p99_us)"
  printf -v "CPU_$kind" '%s' "$(( ($(cpu_ms "$pid") - c0) * 1000 / (RATE * (DURATION + WARMUP)) ))"
}

echo "| round | order | direct p50/p99 µs | native added p50/p99 µs | wasm added p50/p99 µs | router CPU per request, native / wasm |"
echo "|---|---|---|---|---|---|"
sum_n=0; sum_w=0; cpu_n=0; cpu_w=0
for r in $(seq "$ROUNDS"); do
  # The two routers take turns going first (ABBA), so drift on a shared machine
  # does not always land on the same one.
  if [ $((r % 2)) = 1 ]; then order="native wasm"; else order="wasm native"; fi
  d=$(run "$ADDR_up1")
  for k in $order; do run_router "$k"; done
  d50=$(field "$d" p50_us); d99=$(field "$d" p99_us)
  n50=$(( P50_native - d50 )); n99=$(( P99_native - d99 ))
  w50=$(( P50_wasm - d50 )); w99=$(( P99_wasm - d99 ))
  echo "| $r | ${order/ / → } | $d50 / $d99 | $n50 / $n99 | $w50 / $w99 | $CPU_native / $CPU_wasm µs |"
  sum_n=$((sum_n + n50)); sum_w=$((sum_w + w50)); cpu_n=$((cpu_n + CPU_native)); cpu_w=$((cpu_w + CPU_wasm))
done
python3 - "$sum_n" "$sum_w" "$cpu_n" "$cpu_w" <<'PY'
import sys
n, w, cn, cw = map(int, sys.argv[1:])
ratio = w / n if n > 0 else float("nan")
print(f"\nadded p50, summed over rounds: native {n} µs, wasm {w} µs → wasm/native = {ratio:.2f} "
      f"(target ≤ 1.10: {'PASS' if ratio <= 1.10 else 'MISS'})")
print(f"router CPU per request, summed over rounds: native {cn} µs, wasm {cw} µs → {cw / cn:.2f}×")
PY
