#!/usr/bin/env bash
# Chaos benchmark (issue #5): the local stack — router, two supervised SmolLM2 replicas,
# standard policies — under steady load while a shard process is killed (SIGKILL) every
# few seconds and the balancing policy is hot-swapped halfway through. Reports the share of
# requests answered (degraded answers counted separately) and malformed streams.
#
#   bash bench/chaos.sh                      # 10,000 requests, a kill every 5 s
#   REQUESTS=20000 KILL_EVERY=3 bash bench/chaos.sh
#
# Target: >= 99.99% answered, 0 malformed streams. Writes bench/results/chaos-<stamp>.md.
set -euo pipefail

REQUESTS="${REQUESTS:-10000}"
CONCURRENCY="${CONCURRENCY:-8}"
KILL_EVERY="${KILL_EVERY:-5}"
STREAM_SHARE="${STREAM_SHARE:-0.5}"
MAX_TOKENS="${MAX_TOKENS:-6}"
MAX_SECONDS="${MAX_SECONDS:-0}"    # stop sending after this long even if REQUESTS is not reached (0: never)
PORT="${PORT:-18080}"
ADMIN_PORT="${ADMIN_PORT:-19901}"
BASE_PORT="${BASE_PORT:-19001}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
MODEL="$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP="$(date +%Y%m%d-%H%M%S)"
log() { printf '[chaos %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "building the router, the shard server and the policies (release)"
cargo build --release -q -p switchyard -p switchyard-shard
scripts/build-policies.sh "$TARGET_DIR/release/switchyard" >/dev/null

WORK="$(mktemp -d)"
ROUTER_PID=""
cleanup() {
    [ -n "$ROUTER_PID" ] && kill -TERM "$ROUTER_PID" 2>/dev/null && wait "$ROUTER_PID" 2>/dev/null || true
    mkdir -p bench/results && cp "$WORK/router.log" "bench/results/chaos-$STAMP-router.log" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/plugins"
cp plugins/least-request.wasm "$WORK/plugins/bal.wasm"
cp plugins/fallback.wasm "$WORK/plugins/fallback.wasm"

cat > "$WORK/switchyard.toml" <<EOF
[[listeners]]
addr = "127.0.0.1:$PORT"

[admin]
enabled = true
addr = "127.0.0.1:$ADMIN_PORT"

[plugins]
dir = "$WORK/plugins"
debounce = "50ms"

[[models]]
name = "smollm2"
policy = { balance = "bal", fallback = "fallback" }
fallback = { models = [], primary_timeout = "5s", budget = "15s", rule_based = true }

[models.retry]
max_attempts = 3
budget_ratio = 0.5
min_retries_per_sec = 20

# Local replicas restart in about a second: keep the ejection and breaker back-offs short
# (the defaults suit remote endpoints, where a failure tends to last).
[models.outlier]
consecutive_failures = 3
base_ejection = "1s"
max_ejection = "4s"

[models.circuit_breaker]
open_for = "2s"

[models.health_check]
enabled = true
path = "/health"
interval = "1s"
unhealthy_after = 1
healthy_after = 1

[models.local]
replicas = 2
shards = 1
model = "$MODEL"
fetch = true
layers = 30
base_port = $BASE_PORT
restart_backoff = "200ms"
max_restart_backoff = "2s"

[degraded]
default_answer = "The assistant is temporarily degraded; please try again in a few minutes."
EOF

"$TARGET_DIR/release/switchyard" check-config "$WORK/switchyard.toml"
log "starting the router (2 local replicas)"
"$TARGET_DIR/release/switchyard" serve --config "$WORK/switchyard.toml" 2>"$WORK/router.log" &
ROUTER_PID=$!
for _ in $(seq 1 300); do
    healthy=$( (curl -s "127.0.0.1:$ADMIN_PORT/admin/endpoints" || true) \
        | python3 -c 'import re,sys; print(len(re.findall(r"\"healthy\":\s*true", sys.stdin.read())))')
    [ "$healthy" -ge 2 ] && break
    sleep 0.5
done
[ "${healthy:-0}" -ge 2 ] || { log "replicas never became healthy"; curl -s "127.0.0.1:$ADMIN_PORT/admin/endpoints" >&2; tail -20 "$WORK/router.log" >&2; exit 1; }

log "load: $REQUESTS requests, $CONCURRENCY clients, ${STREAM_SHARE} streamed; a shard killed every ${KILL_EVERY}s"
REPORT="$(python3 bench/chaos.py --port "$PORT" --router-pid "$ROUTER_PID" --plugins "$WORK/plugins" \
    --swap-to plugins/round-robin.wasm --requests "$REQUESTS" --concurrency "$CONCURRENCY" \
    --kill-every "$KILL_EVERY" --stream-share "$STREAM_SHARE" --max-tokens "$MAX_TOKENS" --max-seconds "$MAX_SECONDS")"
RESTARTS="$(curl -s "127.0.0.1:$ADMIN_PORT/admin/replicas" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(p.get("restarts",0) for p in (d if isinstance(d,list) else d.get("processes",[]))))' 2>/dev/null || echo "?")"
SWAP="$(curl -s "127.0.0.1:$ADMIN_PORT/admin/plugins" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps(d)[:400])' 2>/dev/null || echo "?")"

mkdir -p bench/results
OUT="bench/results/chaos-$STAMP.md"
python3 - "$REPORT" "$RESTARTS" "$OUT" <<'PY'
import json, sys
r, restarts, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
share = r["answered_share"] * 100
ok = share >= 99.99 and r["malformed_streams"] == 0
lines = [
    "## Chaos benchmark",
    "",
    f"{r['requests']} requests in {r['seconds']} s ({r['req_per_s']} req/s), {r['streams']} of them streamed; "
    f"{r['shard_kills']} shard processes killed (SIGKILL), {restarts} restarts by the supervisor; "
    f"balancing policy hot-swapped at {r['hot_swap_at_s']} s.",
    "",
    "| answered | of which degraded | failed | malformed streams |",
    "|---:|---:|---:|---:|",
    f"| {r['answered']} ({share:.3f}%) | {r['degraded']} | {r['failed']} | {r['malformed_streams']} |",
    "",
    f"Target >= 99.99% answered and 0 malformed streams: **{'PASS' if ok else 'MISS'}**",
]
if r["failures"]:
    lines += ["", "First failures:", ""] + [f"- {f}" for f in r["failures"]]
text = "\n".join(lines) + "\n"
open(out, "w").write(text)
print(text)
PY
log "written to $OUT"
