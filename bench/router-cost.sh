#!/usr/bin/env bash
# What the router itself costs per request, in measures a noisy machine cannot move much:
#
#   bash bench/router-cost.sh
#
# 1. User-space instructions per proxied request: router and nginx, one worker each, run
#    under valgrind's callgrind, which counts instructions, not time (the same binary and
#    load give counts within 0.3% whatever else the machine does). Closed loop, CONNECTIONS_CG
#    connections, counted over CG_DURATION seconds after a warm-up.
# 2. System calls per request at RATE req/s (strace -c on the running proxy).
# 3. The proxy's own time on the request path at RATE req/s, from syscall tracepoints
#    (perf): read of the client's request -> write of it upstream ("request half"), read of
#    the upstream's answer -> write of it to the client ("response half"); p50 and p90 in µs,
#    median of HALF_ROUNDS rounds in which router and nginx take turns
#    (bench/trace_halves.py). This is the part of the added latency that is the proxy's own
#    work; the rest is the kernel waking it.
# Prints a markdown report and writes it to bench/results/router-cost-<timestamp>.md.
set -euo pipefail

RATE="${RATE:-2000}"
CG_DURATION="${CG_DURATION:-10}"
CONNECTIONS_CG="${CONNECTIONS_CG:-4}"
CONNECTIONS="${CONNECTIONS:-64}"
ROUTER_WORKERS="${ROUTER_WORKERS:-2}"
NGINX_WORKERS="${NGINX_WORKERS:-2}"
HALF_ROUNDS="${HALF_ROUNDS:-4}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
LOADGEN="$TARGET_DIR/release/loadgen"
ROUTER="${ROUTER:-$TARGET_DIR/release/switchyard}"
STAMP="$(date +%Y%m%d-%H%M%S)"
RESULT_FILE="$ROOT/bench/results/router-cost-$STAMP.md"
. "$ROOT/bench/lib.sh"

need valgrind valgrind
need strace strace
need perf linux-perf
install_nginx
log "building loadgen and switchyard (release)"
cargo build --release -q -p switchyard-loadgen -p switchyard || die "build failed"

TMP="$(mktemp -d /tmp/switchyard-cost.XXXXXX)"
chmod 755 "$TMP"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -f "$TMP" 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

"$LOADGEN" upstream --listen 127.0.0.1:0 --workers 1 >"$TMP/upstream.out" 2>"$TMP/upstream.err" &
PIDS+=($!)
UPSTREAM="$(wait_listening "$TMP/upstream.out" "$!" upstream)"

# $1: name, $2: workers. Valgrind cannot reserve the address space of wasmtime's pooling
# allocator at its default size: one instance slot is enough for a policy-less router.
router_config() {
    cat >"$TMP/$1.toml" <<EOT
[[listeners]]
addr = "127.0.0.1:0"
[admin]
enabled = false
[plugins]
dir = "$TMP/plugins-$1"
max_instances = 1
[[models]]
name = "bench"
health_check = { enabled = true, path = "/health", interval = "1s" }
[[models.endpoints]]
url = "http://$UPSTREAM"
EOT
}

# $1: name, $2: workers, $3: port, $4: "vg" for the valgrind layout (one process, no master)
nginx_config() {
    mkdir -p "$TMP/$1"
    local extra=""
    [ "${4:-}" = vg ] && extra="master_process off; daemon off;"
    cat >"$TMP/$1/nginx.conf" <<EOT
worker_processes $2;
$extra
pid $TMP/$1/nginx.pid;
error_log $TMP/$1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/$1/cb; proxy_temp_path $TMP/$1/p; fastcgi_temp_path $TMP/$1/f; uwsgi_temp_path $TMP/$1/u; scgi_temp_path $TMP/$1/s;
    keepalive_requests 1000000;
    upstream bu { server $UPSTREAM; keepalive 128; keepalive_requests 1000000; }
    server { listen 127.0.0.1:$3; location / { proxy_pass http://bu; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
EOT
}

# ------------------------------------------------------------- 1. instructions
# $1: name, $2: url, $3: pid under callgrind, $4: its stderr, $5: its --callgrind-out-file.
# Prints the instructions collected and the requests answered.
count_instructions() {
    "$LOADGEN" max --url "$2" --duration 3 --connections "$CONNECTIONS_CG" --json >/dev/null
    callgrind_control -i on "$3" >/dev/null
    local ok
    ok="$("$LOADGEN" max --url "$2" --duration "$CG_DURATION" --connections "$CONNECTIONS_CG" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["ok"])')"
    callgrind_control -i off "$3" >/dev/null
    # Dump the counts now rather than wait for the process to exit (nginx under valgrind
    # can take long to): the dump's `totals:` line is what was collected.
    callgrind_control -d "$3" >/dev/null
    local ir="" dump
    for _ in $(seq 100); do
        dump="$(ls -t "$5".* 2>/dev/null | head -n1)"
        [ -n "$dump" ] && ir="$(sed -n 's/^totals: \([0-9]*\).*/\1/p' "$dump")"
        [ -n "$ir" ] && break
        sleep 0.2
    done
    kill "$3" 2>/dev/null || true
    [ -n "$ir" ] && [ "${ok:-0}" -gt 0 ] || die "$1: no count (see $4)"
    echo "$ir $ok"
}

log "1/3 instructions per request (callgrind, ${CG_DURATION}s each)"
router_config router-vg
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/router.cg" \
    "$ROUTER" serve --workers 1 --config "$TMP/router-vg.toml" >"$TMP/router-vg.out" 2>"$TMP/router-vg.err" &
RVG=$!
PIDS+=($RVG)
RVG_URL="http://$(wait_listening "$TMP/router-vg.out" "$RVG" "router under valgrind" 180)"
read -r R_IR R_OK < <(count_instructions router "$RVG_URL" "$RVG" "$TMP/router-vg.err" "$TMP/router.cg")

NGINX_VG_PORT="$(free_port)"
nginx_config nginx-vg 1 "$NGINX_VG_PORT" vg
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/nginx.cg" \
    nginx -e "$TMP/nginx-vg/error.log" -c "$TMP/nginx-vg/nginx.conf" -p "$TMP/nginx-vg" >"$TMP/nginx-vg.out" 2>"$TMP/nginx-vg.err" &
NVG=$!
PIDS+=($NVG)
wait_port "$NGINX_VG_PORT" "nginx under valgrind" 60
read -r N_IR N_OK < <(count_instructions nginx "http://127.0.0.1:$NGINX_VG_PORT" "$NVG" "$TMP/nginx-vg.err" "$TMP/nginx.cg")
[ -n "${R_IR:-}" ] && [ -n "${N_IR:-}" ] || die "no instruction count (see the messages above)"
R_IPR=$((R_IR / R_OK))
N_IPR=$((N_IR / N_OK))

# ------------------------------------------------------------- 2 and 3 at RATE
router_config router
"$ROUTER" serve --workers "$ROUTER_WORKERS" --config "$TMP/router.toml" >"$TMP/router.out" 2>"$TMP/router.err" &
RP=$!
PIDS+=($RP)
ROUTER_URL="http://$(wait_listening "$TMP/router.out" "$RP" router 60)"
NGINX_PORT="$(free_port)"
nginx_config nginx "$NGINX_WORKERS" "$NGINX_PORT"
nginx -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" -g 'daemon off;' >/dev/null 2>&1 &
NP=$!
PIDS+=($NP)
wait_port "$NGINX_PORT" nginx 30

# $1: url; runs the rate load for 7 s in the background, sets LOAD_PID
rate_load() {
    "$LOADGEN" rate --url "$1" --rate "$RATE" --duration 7 --warmup 1 --connections "$CONNECTIONS" --json >"$TMP/rate.json" 2>&1 &
    LOAD_PID=$!
    sleep 2.5
}

# $1: main pid of the proxy -> its pids (nginx: master and workers), comma-separated
pids_of() { { echo "$1"; pgrep -P "$1" || true; } | paste -sd, -; }

log "2/3 system calls per request (strace, 3 s at $RATE req/s each)"
syscalls_per_request() {
    rate_load "$2"
    local args=()
    for p in $(echo "$1" | tr , ' '); do args+=(-p "$p"); done
    timeout -s INT 3 strace -f -c -o "$TMP/strace.txt" "${args[@]}" >/dev/null 2>&1 || true
    wait "$LOAD_PID" || true
    local calls
    calls="$(awk '$NF=="total"{print $4}' "$TMP/strace.txt")"
    python3 -c "print(f'{$calls / ($RATE * 3):.1f}')"
}
R_SYS="$(syscalls_per_request "$(pids_of $RP)" "$ROUTER_URL")"
N_SYS="$(syscalls_per_request "$(pids_of $NP)" "http://127.0.0.1:$NGINX_PORT")"

log "3/3 the proxy's own time per half (perf tracepoints, 1 s at $RATE req/s each, $HALF_ROUNDS rounds)"
halves() {
    rate_load "$2"
    perf record -q -a -e raw_syscalls:sys_enter,raw_syscalls:sys_exit --exclude-perf -o "$TMP/perf.data" -- sleep 1 >/dev/null 2>&1
    local client=$LOAD_PID
    wait "$LOAD_PID" || true
    perf script -i "$TMP/perf.data" -F pid,tid,time,event,trace 2>/dev/null | python3 "$ROOT/bench/trace_halves.py" "$1" "$client"
}
# The VM's speed drifts within minutes: router and nginx take turns, HALF_ROUNDS times,
# and each cell is the median of the rounds.
R_HALVES=()
N_HALVES=()
for ((r = 1; r <= HALF_ROUNDS; r++)); do
    if ((r % 2)); then
        R_HALVES+=("$(halves "$(pids_of $RP)" "$ROUTER_URL")")
        N_HALVES+=("$(halves "$(pids_of $NP)" "http://127.0.0.1:$NGINX_PORT")")
    else
        N_HALVES+=("$(halves "$(pids_of $NP)" "http://127.0.0.1:$NGINX_PORT")")
        R_HALVES+=("$(halves "$(pids_of $RP)" "$ROUTER_URL")")
    fi
done
# $1: half, $2: percentile key, then the rounds' JSON lines -> median over rounds
half() {
    local h=$1 p=$2
    shift 2
    printf '%s\n' "$@" | python3 -c "import json,statistics,sys; print(statistics.median(json.loads(l)['$h']['$p'] for l in sys.stdin if l.strip()))"
}

mkdir -p "$ROOT/bench/results"
{
    echo "# Router cost per request ($STAMP)"
    echo
    echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
    echo
    echo "| measure | router | nginx | router / nginx |"
    echo "|---|---|---|---|"
    printf '| user-space instructions per request (callgrind, 1 worker; %s and %s requests) | %s | %s | %.2f |\n' \
        "$R_OK" "$N_OK" "$R_IPR" "$N_IPR" "$(python3 -c "print($R_IPR/$N_IPR)")"
    printf '| system calls per request at %s req/s | %s | %s | %.2f |\n' "$RATE" "$R_SYS" "$N_SYS" "$(python3 -c "print($R_SYS/$N_SYS)")"
    for h in request response; do
        for p in p50_us p90_us; do
            r="$(half $h $p "${R_HALVES[@]}")"
            n="$(half $h $p "${N_HALVES[@]}")"
            printf '| own time, %s half, %s (µs; median of %s rounds) | %s | %s | %.2f |\n' "$h" "${p%_us}" "$HALF_ROUNDS" "$r" "$n" "$(python3 -c "print($r/$n)")"
        done
    done
    echo
    echo "Rounds (own time, JSON from bench/trace_halves.py):"
    echo
    for ((r = 0; r < HALF_ROUNDS; r++)); do
        echo "- round $((r + 1)): router ${R_HALVES[$r]}; nginx ${N_HALVES[$r]}"
    done
} | tee "$RESULT_FILE"
log "written to ${RESULT_FILE#"$ROOT"/}"
