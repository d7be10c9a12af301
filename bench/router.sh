#!/usr/bin/env bash
# Benchmark of the Switchyard router core against a direct connection and nginx.
#
#   bash bench/router.sh
#
# Phase 1: open-loop latency at a fixed rate (RATE, DURATION, WARMUP) against the fake
#          upstream directly, through the router and through nginx; added latency = proxy - direct.
# Phase 2: closed-loop throughput (MAX_ROUNDS rounds of MAX_DURATION, CONNECTIONS) through the
#          router and nginx, taking turns to go first; the ratio is of the summed rates, so a
#          slow spell of the machine lands on both.
# Then:    the router's peak RSS (VmHWM).
# Prints a markdown summary with PASS/MISS per target and writes it, with the raw JSON lines,
# to bench/results/router-<timestamp>.md. See bench/README.md.
set -euo pipefail

RATE="${RATE:-2000}"
DURATION="${DURATION:-20}"
WARMUP="${WARMUP:-3}"
MAX_DURATION="${MAX_DURATION:-5}"
MAX_ROUNDS="${MAX_ROUNDS:-4}"
MAX_WARMUP="${MAX_WARMUP:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
LOADGEN_THREADS="${LOADGEN_THREADS:-1}"
UPSTREAM_WORKERS="${UPSTREAM_WORKERS:-1}"
ROUTER_WORKERS="${ROUTER_WORKERS:-}"     # empty: the router's default (one per core)
NGINX_WORKERS="${NGINX_WORKERS:-2}"
BUILD_RETRIES="${BUILD_RETRIES:-5}"
QUIET_BUSY_PCT="${QUIET_BUSY_PCT:-15}" # wait while other processes use more of the CPUs than this
QUIET_TIMEOUT="${QUIET_TIMEOUT:-180}"  # ... but at most this many seconds per run

# Targets.
MAX_ADDED_P50_US=50
MAX_ADDED_P99_US=250
MIN_THROUGHPUT_RATIO=0.8
MAX_RSS_MIB=64

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
LOADGEN="$TARGET_DIR/release/loadgen"
ROUTER="$TARGET_DIR/release/switchyard"
RESULTS_DIR="$ROOT/bench/results"
STAMP="$(date +%Y%m%d-%H%M%S)"
RESULT_FILE="$RESULTS_DIR/router-$STAMP.md"
# log, die, install_nginx, wait_listening, port_in_use, wait_port
. "$ROOT/bench/lib.sh"


# ---------------------------------------------------------------------------- setup


build() {
    log "building loadgen (release)"
    cargo build --release -q -p switchyard-loadgen || die "loadgen build failed"
    # The router may be mid-edit by someone else: retry, then fall back to the last build.
    local i
    for ((i = 1; i <= BUILD_RETRIES; i++)); do
        log "building switchyard (release), try $i/$BUILD_RETRIES"
        if cargo build --release -q -p switchyard -p switchyard-loadgen; then
            return 0
        fi
        if [ "$i" -lt "$BUILD_RETRIES" ]; then sleep 30; fi
    done
    [ -x "$ROUTER" ] || die "router build failed and there is no earlier build at $ROUTER"
    log "WARNING: router build failed; using the earlier build from $(date -r "$ROUTER")"
    ROUTER_STALE="yes (built $(date -r "$ROUTER" '+%F %T'))"
}

TMP=""
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "$rc" != 0 ]; then
            log "failed (rc=$rc); logs kept in $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM




# Checks that a chat completion through URL answers 200.
smoke() {
    local url=$1 what=$2 code
    command -v curl >/dev/null 2>&1 || return 0
    code="$(curl -s -o "$TMP/smoke-$what.out" -w '%{http_code}' -H 'content-type: application/json' \
        --data '{"model":"bench","messages":[{"role":"user","content":"hi"}]}' \
        "$url/v1/chat/completions" || true)"
    [ "$code" = 200 ] || die "$what answered $code to a smoke request: $(head -c 300 "$TMP/smoke-$what.out" 2>/dev/null)"
}

install_nginx
ROUTER_STALE="no"
build
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
if awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average $LOAD_START before starting: expect noisy results"
fi
mkdir -p "$RESULTS_DIR"
TMP="$(mktemp -d /tmp/switchyard-bench.XXXXXX)"
chmod 755 "$TMP" # nginx workers drop to an unprivileged user
log "work dir $TMP"

# Fake upstream.
"$LOADGEN" upstream --listen 127.0.0.1:0 --workers "$UPSTREAM_WORKERS" >"$TMP/upstream.out" 2>"$TMP/upstream.err" &
UPSTREAM_PID=$!
PIDS+=("$UPSTREAM_PID")
UPSTREAM_ADDR="$(wait_listening "$TMP/upstream.out" "$UPSTREAM_PID" upstream)"
UPSTREAM_PORT="${UPSTREAM_ADDR##*:}"
log "upstream on $UPSTREAM_ADDR (pid $UPSTREAM_PID)"

# Router.
cat >"$TMP/router.toml" <<EOF
[[listeners]]
addr = "127.0.0.1:0"

[[models]]
name = "bench"
health_check = { enabled = true, path = "/health", interval = "1s" }
[[models.endpoints]]
url = "http://127.0.0.1:$UPSTREAM_PORT"
EOF
ROUTER_ARGS=(serve --config "$TMP/router.toml")
if [ -n "$ROUTER_WORKERS" ]; then ROUTER_ARGS+=(--workers "$ROUTER_WORKERS"); fi
"$ROUTER" "${ROUTER_ARGS[@]}" >"$TMP/router.out" 2>"$TMP/router.err" &
ROUTER_PID=$!
PIDS+=("$ROUTER_PID")
ROUTER_ADDR="$(wait_listening "$TMP/router.out" "$ROUTER_PID" router)"
log "router on $ROUTER_ADDR (pid $ROUTER_PID)"

# nginx, on a free port near 18080.
NGINX_PORT=""
for _ in $(seq 1 50); do
    p=$((18080 + RANDOM % 1000))
    if ! port_in_use "$p"; then
        NGINX_PORT=$p
        break
    fi
done
[ -n "$NGINX_PORT" ] || die "no free port for nginx"
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $TMP/nginx/client_body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    # Like the router, never close a busy client connection after N requests.
    keepalive_requests 1000000;
    upstream bench_upstream {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
nginx -t -q -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" 2>"$TMP/nginx/test.err" ||
    die "nginx config test failed: $(cat "$TMP/nginx/test.err")"
nginx -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" -g 'daemon off;' >"$TMP/nginx/stdout" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_port "$NGINX_PORT" nginx
log "nginx on 127.0.0.1:$NGINX_PORT (pid $NGINX_PID)"

DIRECT_URL="http://$UPSTREAM_ADDR"
ROUTER_URL="http://$ROUTER_ADDR"
NGINX_URL="http://127.0.0.1:$NGINX_PORT"
smoke "$DIRECT_URL" direct
smoke "$ROUTER_URL" router
smoke "$NGINX_URL" nginx
# Let the router's first health checks pass before measuring.
sleep 1.5

# ---------------------------------------------------------------------------- helpers

RAW="$TMP/raw.jsonl"
: >"$RAW"

# jnum JSON KEY: a numeric field of a loadgen JSON line, or NA.
jnum() {
    local v
    v="$(sed -nE "s/.*\"$2\":(-?[0-9.]+).*/\1/p" <<<"$1")"
    echo "${v:-NA}"
}
# calc EXPR with awk; NA in, NA out.
calc() {
    case "$*" in *NA*) echo NA; return ;; esac
    awk "BEGIN { printf \"%s\", $* }"
}
# verdict OK_EXPR: PASS, MISS or NA.
verdict() {
    case "$*" in *NA*) echo "n/a"; return ;; esac
    awk "BEGIN { print (($*) ? \"PASS\" : \"MISS\") }"
}

HZ="$(getconf CLK_TCK)"
NCPU="$(nproc)"

# CPU ticks (user+system) of a process and its threads; of its children too with -c.
proc_ticks() {
    local pid=$1 total=0 p t
    local pids=("$pid")
    if [ "${2:-}" = "-c" ]; then
        mapfile -t -O 1 pids < <(pgrep -P "$pid" || true)
        pids[0]=$pid
    fi
    for p in "${pids[@]}"; do
        # utime and stime are fields 14 and 15, i.e. 12 and 13 after the ") " ending the name.
        t="$(sed -E 's/.*\) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }')" || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
# Busy CPU ticks of the whole machine.
sys_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
# Ticks of every process of this benchmark (idle between runs).
our_ticks() {
    echo $(($(proc_ticks "$UPSTREAM_PID") + $(proc_ticks "$ROUTER_PID") + $(proc_ticks "$NGINX_PID" -c)))
}

# Waits (up to QUIET_TIMEOUT s) until the rest of the machine uses under QUIET_BUSY_PCT % of
# the CPUs, so that a shared machine's bursts (builds, tests) do not land in a measurement.
wait_quiet() {
    local waited=0 quiet=0 s0 o0 t0 s1 o1 t1 busy
    while :; do
        s0="$(sys_ticks)"
        o0="$(our_ticks)"
        t0="$(date +%s%N)"
        sleep 1
        s1="$(sys_ticks)"
        o1="$(our_ticks)"
        t1="$(date +%s%N)"
        busy=$(((s1 - s0 - (o1 - o0)) * 100 * 1000000000 / HZ / NCPU / (t1 - t0)))
        if [ "$busy" -le "$QUIET_BUSY_PCT" ]; then
            quiet=$((quiet + 1))
        else
            quiet=0
        fi
        # Two quiet seconds in a row: not just a gap between two compiler runs.
        if [ "$quiet" -ge 2 ]; then
            [ "$waited" -lt 2 ] || log "machine quiet after ${waited}s"
            return 0
        fi
        if [ "$waited" -ge "$QUIET_TIMEOUT" ]; then
            log "WARNING: other load still ${busy}% of the CPUs after ${waited}s; measuring anyway"
            return 0
        fi
        if [ "$quiet" = 0 ] && [ $((waited % 15)) = 0 ]; then
            log "waiting for the machine to quiet down (other load ${busy}% of the CPUs)"
        fi
        waited=$((waited + 1))
    done
}

# run_load NAME MODE URL [ARGS...]: runs loadgen, stores the JSON line in RESULT_<NAME>, the
# CPU seconds of router and nginx in CPU_ROUTER/CPU_NGINX[NAME], and the share of the
# machine's CPU used by anything outside this benchmark during the run in OTHER_CPU[NAME].
run_load() {
    local name=$1 mode=$2 url=$3
    shift 3
    local line rc=0 r0 n0 s0 o0 t0 lg
    wait_quiet
    r0="$(proc_ticks "$ROUTER_PID")"
    n0="$(proc_ticks "$NGINX_PID" -c)"
    o0="$(our_ticks)"
    s0="$(sys_ticks)"
    t0="$(date +%s.%N)"
    log "$name: loadgen $mode $url $*"
    {
        TIMEFORMAT='%U %S'
        time "$LOADGEN" --threads "$LOADGEN_THREADS" "$mode" --url "$url" --json "$@" \
            >"$TMP/loadgen-$name.out" 2>"$TMP/loadgen-$name.err"
    } 2>"$TMP/loadgen-$name.time" || rc=$?
    local s1 o1 t1
    s1="$(sys_ticks)"
    o1="$(our_ticks)"
    t1="$(date +%s.%N)"
    line="$(head -n1 "$TMP/loadgen-$name.out")"
    if [ "$rc" != 0 ] || [ -z "$line" ]; then
        log "$name: loadgen failed (rc=$rc): $(head -c 500 "$TMP/loadgen-$name.err")"
        line="{\"mode\":\"$mode\",\"name\":\"$name\",\"failed\":true}"
    else
        line="{\"name\":\"$name\",${line#\{}"
    fi
    CPU_ROUTER[$name]="$(calc "($(proc_ticks "$ROUTER_PID") - $r0) / $HZ")"
    CPU_NGINX[$name]="$(calc "($(proc_ticks "$NGINX_PID" -c) - $n0) / $HZ")"
    lg="$(awk '{ print $1 + $2 }' "$TMP/loadgen-$name.time" 2>/dev/null || echo 0)"
    OTHER_CPU[$name]="$(awk -v s=$((s1 - s0)) -v o=$((o1 - o0)) -v lg="${lg:-0}" -v hz="$HZ" \
        -v n="$NCPU" -v w="$(calc "$t1 - $t0")" \
        'BEGIN { x = ((s - o) / hz - lg) / (w * n) * 100; printf "%.0f", (x < 0 ? 0 : x) }')"
    echo "$line" >>"$RAW"
    printf -v "RESULT_$name" '%s' "$line"
    log "$name: $line"
    log "$name: router CPU ${CPU_ROUTER[$name]} s, nginx CPU ${CPU_NGINX[$name]} s, loadgen CPU $lg s, other load ${OTHER_CPU[$name]}%"
}
declare -A CPU_ROUTER CPU_NGINX OTHER_CPU

# ---------------------------------------------------------------------------- phase 1

log "phase 1: open loop, $RATE req/s, ${DURATION}s (+${WARMUP}s warm-up), $CONNECTIONS connections"
RATE_ARGS=(--rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" --connections "$CONNECTIONS")
run_load direct rate "$DIRECT_URL" "${RATE_ARGS[@]}"
run_load router rate "$ROUTER_URL" "${RATE_ARGS[@]}"
run_load nginx rate "$NGINX_URL" "${RATE_ARGS[@]}"

# ---------------------------------------------------------------------------- phase 2

log "phase 2: closed loop, $MAX_ROUNDS rounds of ${MAX_DURATION}s (+${MAX_WARMUP}s warm-up), $CONNECTIONS connections"
MAX_ARGS=(--duration "$MAX_DURATION" --warmup "$MAX_WARMUP" --connections "$CONNECTIONS")
RSUM=0
NSUM=0
ROUND_ROWS=""
for ((round = 1; round <= MAX_ROUNDS; round++)); do
    if ((round % 2)); then order="router nginx"; else order="nginx router"; fi
    for who in $order; do
        if [ "$who" = router ]; then
            run_load router_max max "$ROUTER_URL" "${MAX_ARGS[@]}"
        else
            run_load nginx_max max "$NGINX_URL" "${MAX_ARGS[@]}"
        fi
    done
    r="$(jnum "$RESULT_router_max" rps)"
    n="$(jnum "$RESULT_nginx_max" rps)"
    RSUM="$(calc "$RSUM + $r")"
    NSUM="$(calc "$NSUM + $n")"
    ROUND_ROWS+="| $round | ${order/ / then } | $r | $n | $(calc "$r / $n") |"$'\n'
done

# ---------------------------------------------------------------------------- memory

kill -0 "$ROUTER_PID" 2>/dev/null || die "router died during the benchmark; see $TMP/router.err"
HWM_KIB="$(awk '/^VmHWM:/ { print $2 }' "/proc/$ROUTER_PID/status")"
RSS_KIB="$(awk '/^VmRSS:/ { print $2 }' "/proc/$ROUTER_PID/status")"
THREADS="$(awk '/^Threads:/ { print $2 }' "/proc/$ROUTER_PID/status")"
HWM_MIB="$(printf '%.1f' "$(calc "$HWM_KIB / 1024")")"
RSS_MIB="$(printf '%.1f' "$(calc "$RSS_KIB / 1024")")"
ROUTER_LOG_LINES="$(wc -l <"$TMP/router.err")"
ROUTER_WARN_LINES="$(grep -c -E 'WARN|ERROR' "$TMP/router.err" || true)"

# ---------------------------------------------------------------------------- report

row_rate() {
    local name=$1 j
    j="${!2}"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" \
        "$(jnum "$j" p50_us)" "$(jnum "$j" p90_us)" "$(jnum "$j" p99_us)" "$(jnum "$j" p999_us)" \
        "$(jnum "$j" max_us)" "$(jnum "$j" achieved_rps)" "$(jnum "$j" non_2xx)" "$(jnum "$j" errors)" \
        "$(jnum "$j" lag_p99_us)" "$3" "${OTHER_CPU[$name]:-NA}"
}

D50="$(jnum "$RESULT_direct" p50_us)"
D99="$(jnum "$RESULT_direct" p99_us)"
R50="$(jnum "$RESULT_router" p50_us)"
R99="$(jnum "$RESULT_router" p99_us)"
N50="$(jnum "$RESULT_nginx" p50_us)"
N99="$(jnum "$RESULT_nginx" p99_us)"
ADD_R50="$(calc "$R50 - $D50")"
ADD_R99="$(calc "$R99 - $D99")"
ADD_N50="$(calc "$N50 - $D50")"
ADD_N99="$(calc "$N99 - $D99")"
RATIO="$(calc "$RSUM / $NSUM")"
[ "$RATIO" = NA ] || RATIO="$(printf '%.2f' "$RATIO")"
# CPU milliseconds per 1000 requests in phase 1 (the CPU time covers warm-up and measurement).
per_k() { calc "$1 * 1000 * 1000 / $2"; }
REQS="$(calc "$RATE * ($DURATION + $WARMUP)")"
CPU_R_K="$(per_k "${CPU_ROUTER[router]}" "$REQS")"
CPU_N_K="$(per_k "${CPU_NGINX[nginx]}" "$REQS")"

SUMMARY="$TMP/summary.md"
{
    echo "# Switchyard router benchmark, $STAMP"
    echo
    echo "Host: $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r)."
    echo "Router: $ROUTER (stale build: $ROUTER_STALE), workers ${ROUTER_WORKERS:-default}; nginx $(nginx -v 2>&1 | sed 's#.*/##'), $NGINX_WORKERS workers;"
    echo "loadgen threads $LOADGEN_THREADS; upstream workers $UPSTREAM_WORKERS; no CPU pinning."
    echo "Load average (1/5/15 min) after the build: $LOAD_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "## Phase 1: latency at $RATE req/s (open loop, ${DURATION} s after ${WARMUP} s warm-up, $CONNECTIONS connections)"
    echo
    echo "Latency in µs from the scheduled send time to the end of the response (2xx only)."
    echo
    echo '| target | p50 | p90 | p99 | p99.9 | max | achieved req/s | non-2xx | errors | loadgen lag p99 | proxy CPU ms / 1k req | other load % |'
    echo '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
    row_rate direct RESULT_direct "-"
    row_rate router RESULT_router "$(printf '%.1f' "$CPU_R_K" 2>/dev/null || echo NA)"
    row_rate nginx RESULT_nginx "$(printf '%.1f' "$CPU_N_K" 2>/dev/null || echo NA)"
    echo
    echo '| added latency (µs) | p50 | p99 |'
    echo '|---|---:|---:|'
    echo "| router − direct | $ADD_R50 | $ADD_R99 |"
    echo "| nginx − direct | $ADD_N50 | $ADD_N99 |"
    echo
    echo "## Phase 2: throughput (closed loop, $MAX_ROUNDS rounds of ${MAX_DURATION} s after ${MAX_WARMUP} s warm-up, $CONNECTIONS connections)"
    echo
    echo '| round | order | router req/s | nginx req/s | ratio |'
    echo '|---:|---|---:|---:|---:|'
    printf '%s' "$ROUND_ROWS"
    echo
    echo 'The last round in full:'
    echo
    echo '| target | req/s (2xx) | p50 µs | p99 µs | p99.9 µs | non-2xx | errors | proxy CPU s | other load % |'
    echo '|---|---:|---:|---:|---:|---:|---:|---:|---:|'
    for n in router_max nginx_max; do
        v="RESULT_$n"
        j="${!v}"
        if [ "$n" = router_max ]; then c="${CPU_ROUTER[$n]}"; else c="${CPU_NGINX[$n]}"; fi
        echo "| ${n%_max} | $(jnum "$j" rps) | $(jnum "$j" p50_us) | $(jnum "$j" p99_us) | $(jnum "$j" p999_us) | $(jnum "$j" non_2xx) | $(jnum "$j" errors) | $c | ${OTHER_CPU[$n]:-NA} |"
    done
    echo
    echo "router / nginx throughput, summed over the rounds: **$RATIO×**"
    echo
    echo "## Router process"
    echo
    echo "Peak RSS (VmHWM) **$HWM_MIB MiB** ($HWM_KIB KiB); RSS at the end $RSS_MIB MiB; $THREADS threads;"
    echo "stderr: $ROUTER_LOG_LINES lines, $ROUTER_WARN_LINES WARN/ERROR."
    echo
    echo "## Targets"
    echo
    echo '| target | goal | measured | result |'
    echo '|---|---|---:|---|'
    echo "| added p50 at $RATE req/s | ≤ $MAX_ADDED_P50_US µs | $ADD_R50 µs | $(verdict "$ADD_R50 <= $MAX_ADDED_P50_US") |"
    echo "| added p99 at $RATE req/s | ≤ $MAX_ADDED_P99_US µs | $ADD_R99 µs | $(verdict "$ADD_R99 <= $MAX_ADDED_P99_US") |"
    echo "| throughput vs nginx | ≥ ${MIN_THROUGHPUT_RATIO}× | ${RATIO}× | $(verdict "$RATIO >= $MIN_THROUGHPUT_RATIO") |"
    echo "| router peak RSS | ≤ $MAX_RSS_MIB MiB | $HWM_MIB MiB | $(verdict "$HWM_MIB <= $MAX_RSS_MIB") |"
} >"$SUMMARY"

{
    cat "$SUMMARY"
    echo
    echo "## Raw loadgen output (JSON lines)"
    echo
    echo '```json'
    cat "$RAW"
    echo '```'
    if [ "$ROUTER_WARN_LINES" != 0 ]; then
        echo
        echo "## Router warnings (first 20)"
        echo
        echo '```'
        grep -E 'WARN|ERROR' "$TMP/router.err" | head -n 20
        echo '```'
    fi
} >"$RESULT_FILE"

echo
cat "$SUMMARY"
echo
log "written to $RESULT_FILE"
