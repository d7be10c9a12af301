# Shared helpers of the bench scripts (sourced).

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

install_nginx() {
    command -v nginx >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || die "nginx is missing and we are not root to install it"
    log "installing nginx"
    # Keep the package's postinst from starting a system nginx on port 80.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        added_policy=1
    fi
    local rc=0
    {
        apt-get update -qq &&
            if apt-cache show nginx-light >/dev/null 2>&1; then
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light
            else
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
            fi
    } >&2 || rc=$?
    if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi
    [ "$rc" = 0 ] || die "apt-get install nginx failed"
    command -v nginx >/dev/null 2>&1 || die "nginx still not on PATH after install"
}

# Installs Debian package $2 when command $1 is missing.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] || die "$1 is missing and we are not root to install $2"
    log "installing $2"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; } >&2 || die "apt-get install $2 failed"
    command -v "$1" >/dev/null 2>&1 || die "$1 still not on PATH after installing $2"
}

# Waits until FILE holds "listening on http://HOST:PORT" and prints HOST:PORT
# (within TIMEOUT seconds, default 10).
wait_listening() {
    local file=$1 pid=$2 what=$3 timeout=${4:-10} i addr
    for ((i = 0; i < timeout * 20; i++)); do
        addr="$(sed -nE 's#^listening on http://([^ ]+).*#\1#p' "$file" 2>/dev/null | head -n1)"
        if [ -n "$addr" ]; then
            echo "$addr"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$what exited early; see $TMP"
        sleep 0.05
    done
    die "$what did not report its address within $timeout s; see $TMP"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits until something accepts on PORT (within TIMEOUT seconds, default 10).
wait_port() {
    local port=$1 what=$2 timeout=${3:-10} i
    for ((i = 0; i < timeout * 20; i++)); do
        port_in_use "$port" && return 0
        sleep 0.05
    done
    die "$what is not accepting on port $port; see $TMP"
}

# A TCP port nothing listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
