# bench/lib.sh — shared helpers for the bench scripts (sourced, not executed).
#
# Provides: process bookkeeping with a cleanup trap, a global watchdog, port
# checks, the keep-alive upstream, the peers' and authgate's configs, and
# /proc-based CPU/RSS sampling. Everything binds to 127.0.0.1 only.

# ---------------------------------------------------------------- locations
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
AUTHGATE_BIN=${AUTHGATE_BIN:-$REPO_DIR/target/release/authgate}
HYPER_FLOOR_BIN=${HYPER_FLOOR_BIN:-$REPO_DIR/target/release/examples/hyper_floor}
# bench/pgo.sh builds for the host triple explicitly (see there), so its binary
# lives under target/pgo/<host>/.
HOST_TRIPLE=$(rustc -vV 2>/dev/null | awk '/^host:/ {print $2}' || true)
PGO_BUILT_BIN=$REPO_DIR/target/pgo/$HOST_TRIPLE/release/authgate
AUTHGATE_PGO_BIN=${AUTHGATE_PGO_BIN:-$PGO_BUILT_BIN}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
HAPROXY_BIN=${HAPROXY_BIN:-$(command -v haproxy || echo /usr/sbin/haproxy)}
PYTHON=${PYTHON:-python3}

# ---------------------------------------------------------------- CPU layout
# The proxy under test always gets PROXY_CPU alone; the load generator and the
# upstream share the rest. On a 2-core machine: proxy on CPU 1, wrk and upstream
# on CPU 0. With 3+ cores the upstream gets its own core.
NCPU=$(nproc)
if ((NCPU >= 3)); then
    PROXY_CPU=${PROXY_CPU:-1}; WRK_CPU=${WRK_CPU:-0}; UPSTREAM_CPU=${UPSTREAM_CPU:-2}
elif ((NCPU == 2)); then
    PROXY_CPU=${PROXY_CPU:-1}; WRK_CPU=${WRK_CPU:-0}; UPSTREAM_CPU=${UPSTREAM_CPU:-0}
else
    PROXY_CPU=${PROXY_CPU:-0}; WRK_CPU=${WRK_CPU:-0}; UPSTREAM_CPU=${UPSTREAM_CPU:-0}
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- processes
# Every background process we start is recorded here and killed on exit.
declare -a BENCH_PIDS=()
WATCHDOG_PID=""

track() { BENCH_PIDS+=("$1"); }

# Stop one process by pid: TERM, wait up to 3 s, then KILL.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${BENCH_PIDS[@]}"; do stop_pid "$pid"; done
    [[ -n $WATCHDOG_PID ]] && kill "$WATCHDOG_PID" 2>/dev/null || true
    [[ -n ${RUN_DIR:-} && -z ${KEEP_RUN_DIR:-} ]] && rm -rf "$RUN_DIR"
    exit "$rc"
}

# install_traps MAX_SECONDS: cleanup on any exit, and a watchdog that ends the
# whole run (through the same trap) if it takes longer than MAX_SECONDS.
install_traps() {
    local max=$1
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT TERM
    (
        # The sleep is a child of this subshell: stop it too when we are stopped.
        trap 'kill "$sp" 2>/dev/null; exit 0' TERM
        sleep "$max" & sp=$!
        wait "$sp"
        log "watchdog: run exceeded ${max}s, stopping"
        kill -TERM $$
    ) &
    WATCHDOG_PID=$!
}

# expect_200 WHAT URL [CURL_ARGS...]: stop the run unless URL answers 200. A
# target that fails would otherwise be measured (or trained) on its error path.
expect_200() {
    local what=$1 url=$2 code
    shift 2
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@" "$url" || true)
    [[ $code == 200 ]] || die "$what answered $code instead of 200 on $url"
}

# ---------------------------------------------------------------- ports
port_free() {
    ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

# wait_port PORT PID [SECONDS]: until something accepts on 127.0.0.1:PORT.
wait_port() {
    local port=$1 pid=$2 secs=${3:-10} i
    for i in $(seq $((secs * 20))); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    return 1
}

# ---------------------------------------------------------------- /proc sampling
CLK_TCK=$(getconf CLK_TCK)

# All pids of a process tree (the process and its descendants).
tree_pids() {
    local pid=$1 c
    echo "$pid"
    for c in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}

# CPU ticks summed over a process tree: "TOTAL USER" (utime+stime and utime alone,
# fields 14 and 15). The user part is the proxy's own code; the rest is the kernel
# (mostly loopback TCP), which every proxy pays alike for the same syscalls.
cpu_ticks() {
    local total=0 user=0 p s
    for p in $(tree_pids "$1"); do
        s=$(cat /proc/"$p"/stat 2>/dev/null) || continue
        s=${s##*) }            # drop "pid (comm) " — comm may contain spaces
        set -- $s               # now $1 is field 3 (state)
        total=$((total + ${12} + ${13}))
        user=$((user + ${12}))
    done
    echo "$total $user"
}

# Peak RSS (VmHWM, KiB) of the largest process of a tree: for nginx that is the
# worker, not the master, so peers are not charged for a second process.
peak_rss_kib() {
    local best=0 p v
    for p in $(tree_pids "$1"); do
        v=$(awk '/^VmHWM:/ {print $2}' /proc/"$p"/status 2>/dev/null || echo 0)
        ((${v:-0} > best)) && best=$v
    done
    echo "$best"
}

# Current RSS (VmRSS, KiB) summed over a tree.
rss_kib() {
    local total=0 p v
    for p in $(tree_pids "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' /proc/"$p"/status 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# ---------------------------------------------------------------- upstream
# A tiny keep-alive HTTP upstream: nginx, one worker, answering 200 "ok" when an
# Authorization header is present and 401 otherwise (so a proxy that forgets to
# inject the credential shows up as errors, not as fast responses).
start_upstream() {
    local port=$1 dir=$RUN_DIR/upstream
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 65536;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 32768; multi_accept on; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path $dir/tmp_body;
    map \$http_authorization \$has_auth { "" 0; default 1; }
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        location / {
            default_type text/plain;
            if (\$has_auth = 0) { return 401 "missing authorization\n"; }
            return 200 "ok";
        }
    }
}
CONF
    taskset -c "$UPSTREAM_CPU" "$NGINX_BIN" -p "$dir" -e "$dir/logs/error.log" \
        -c "$dir/nginx.conf" -g 'daemon off;' &
    UPSTREAM_PID=$!
    track "$UPSTREAM_PID"
    wait_port "$port" "$UPSTREAM_PID" || die "upstream nginx did not start (see $dir/logs/error.log)"
}

# ---------------------------------------------------------------- peers
# Connection limits of the peers (PEER_MAXCONN, default 4096): enough for the
# benchmark's connections, without preallocating tables that inflate their RSS.
# nginx as a reverse proxy: 1 worker, the header set, upstream keep-alive.
# /api/x is forwarded as /x — the same prefix stripping authgate does.
# nginx_proxy_conf PORT UPSTREAM_PORT: writes $RUN_DIR/nginx/nginx.conf.
nginx_proxy_conf() {
    local port=$1 up=$2 dir=$RUN_DIR/nginx
    mkdir -p "$dir/logs"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 65536;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections ${PEER_MAXCONN:-4096}; multi_accept on; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path $dir/tmp_body;
    proxy_temp_path $dir/tmp_proxy;
    upstream up {
        server 127.0.0.1:$up;
        keepalive 128;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
        location /api/ {
            proxy_pass http://up/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer static";
        }
    }
}
CONF
}

start_nginx_proxy() {
    local port=$1 up=$2 dir=$RUN_DIR/nginx
    nginx_proxy_conf "$port" "$up"
    taskset -c "$PROXY_CPU" "$NGINX_BIN" -p "$dir" -e "$dir/logs/error.log" \
        -c "$dir/nginx.conf" -g 'daemon off;' &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_port "$port" "$PROXY_PID" || die "nginx proxy did not start (see $dir/logs/error.log)"
}

# HAProxy: one thread, the header set, keep-alive both sides, connection reuse.
# haproxy_conf PORT UPSTREAM_PORT: writes $RUN_DIR/haproxy/haproxy.cfg.
haproxy_conf() {
    local port=$1 up=$2 dir=$RUN_DIR/haproxy
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn ${PEER_MAXCONN:-4096}
    log stderr format raw local0 err

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 30s
    timeout http-keep-alive 300s

frontend fe
    bind 127.0.0.1:$port
    default_backend be

backend be
    http-request replace-path ^/api/(.*) /\1
    http-request set-header Authorization "Bearer static"
    server up 127.0.0.1:$up maxconn 1024
CONF
}

start_haproxy() {
    local port=$1 up=$2 dir=$RUN_DIR/haproxy
    haproxy_conf "$port" "$up"
    taskset -c "$PROXY_CPU" "$HAPROXY_BIN" -db -f "$dir/haproxy.cfg" 2>"$dir/haproxy.log" &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_port "$port" "$PROXY_PID" || die "haproxy did not start (see $dir/haproxy.log)"
}

# ---------------------------------------------------------------- authgate
authgate_available() { [[ -x $AUTHGATE_BIN ]]; }

# ensure_built BIN DEFAULT CARGO_ARGS...: true when BIN is executable. A missing
# BIN is built once with `cargo build --release CARGO_ARGS` when it is the default
# path (the caller did not point elsewhere) and AUTHGATE_BUILD is not 0.
ensure_built() {
    local bin=$1 default=$2
    shift 2
    [[ -x $bin ]] && return 0
    if [[ ${AUTHGATE_BUILD:-1} == 1 && -f $REPO_DIR/Cargo.toml && $bin == "$default" ]]; then
        log "$(basename "$bin") binary missing: cargo build --release $* (once)"
        (cd "$REPO_DIR" && cargo build --release "$@") >&2 || true
    fi
    [[ -x $bin ]]
}

ensure_authgate() { ensure_built "$AUTHGATE_BIN" "$REPO_DIR/target/release/authgate" --bin authgate; }

# The bare-hyper floor (bench/hyper_floor.rs).
ensure_hyper_floor() {
    ensure_built "$HYPER_FLOOR_BIN" "$REPO_DIR/target/release/examples/hyper_floor" --example hyper_floor
}

# start_hyper_floor PORT UPSTREAM_PORT CPUSET (same prefix and token as authgate's route)
start_hyper_floor() {
    local port=$1 up=$2 cpus=$3
    taskset -c "$cpus" "$HYPER_FLOOR_BIN" "127.0.0.1:$port" "127.0.0.1:$up" /api 2>"$RUN_DIR/hyper_floor.log" &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_port "$port" "$PROXY_PID" 15 || { cat "$RUN_DIR/hyper_floor.log" >&2; die "hyper_floor did not start"; }
}

# write_authgate_config FILE PORT UPSTREAM_PORT WORKERS GRANT [IDP_PORT] [EXTRA_LISTEN]
# GRANT is "static" (token from $BENCH_TOKEN) or "client_credentials" (from the
# local IdP at IDP_PORT, secret from $BENCH_SECRET). No audit log, no admin:
# the peers write no access log either.
write_authgate_config() {
    local file=$1 port=$2 up=$3 workers=$4 grant=$5 idp=${6:-} extra=${7:-}
    {
        printf '[listen]\naddr = "127.0.0.1:%s"\n%b\n' "$port" "$extra"
        printf '[runtime]\nworker_threads = %s\n\n' "$workers"
        printf '[store]\nkind = "memory"\n\n'
        printf '[providers.p]\ngrant = "%s"\n' "$grant"
        if [[ $grant == static ]]; then
            printf 'token_env = "BENCH_TOKEN"\n'
        else
            printf 'token_url = "http://127.0.0.1:%s/token"\n' "$idp"
            printf 'client_id = "bench"\nclient_secret_env = "BENCH_SECRET"\n'
        fi
        printf '\n[[routes]]\nprefix = "/api"\nupstream = "http://127.0.0.1:%s"\nprovider = "p"\n' "$up"
    } >"$file"
}

# start_authgate CONFIG PORT CPUSET
start_authgate() {
    local cfg=$1 port=$2 cpus=$3
    BENCH_TOKEN=static BENCH_SECRET=bench-secret RUST_LOG=${RUST_LOG:-warn} \
        taskset -c "$cpus" "$AUTHGATE_BIN" run --config "$cfg" 2>"$cfg.log" &
    PROXY_PID=$!
    track "$PROXY_PID"
    wait_port "$port" "$PROXY_PID" 15 || { cat "$cfg.log" >&2; die "authgate did not start ($cfg)"; }
}

# The tiny OAuth IdP (bench/mock_idp.py), on the load CPU.
start_idp() {
    local port=$1
    taskset -c "$WRK_CPU" "$PYTHON" "$BENCH_DIR/mock_idp.py" --port "$port" 2>"$RUN_DIR/idp.log" &
    IDP_PID=$!
    track "$IDP_PID"
    wait_port "$port" "$IDP_PID" || die "mock IdP did not start"
}

# ---------------------------------------------------------------- machine info
machine_info() {
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo) × $NCPU"
    echo "- kernel: $(uname -r); memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
    if awk '{exit !($1 > 0.5)}' /proc/loadavg; then
        echo "- **warning**: the machine was not idle when the run started; other work competes for the CPUs and the numbers are noisy"
    fi
    echo "- wrk: $(wrk -v 2>&1 | head -1 | awk '{print $2}'), nginx: $("$NGINX_BIN" -v 2>&1 | sed 's#.*/##'), haproxy: $("$HAPROXY_BIN" -v | head -1 | awk '{print $3}')"
    if authgate_available; then
        echo "- authgate: $AUTHGATE_BIN ($(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown))"
    else
        echo "- authgate: not available ($AUTHGATE_BIN missing)"
    fi
    echo "- CPU pinning: proxy on CPU $PROXY_CPU; wrk on CPU $WRK_CPU; upstream on CPU $UPSTREAM_CPU"
}

# Raise the open-files limit as far as allowed (containers often cap the hard limit).
raise_nofile() {
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}
