#!/usr/bin/env bash
# bench/instructions.sh — user-space instructions per proxied request, under callgrind.
#
# req/s on a shared two-core VM moves by ±15 % from one minute to the next; an
# instruction count does not. This runs authgate (worker_threads = 1, static token)
# under valgrind's callgrind in front of the same nginx upstream as dataplane.sh,
# switches instrumentation on only for the measured wrk run (start-up and warm-up
# excluded), and divides. Kernel time (about two thirds of the CPU per request,
# loopback TCP) is not counted: this is the number our own code can move.
#
# Usage: bench/instructions.sh [BIN ...]   (default: $AUTHGATE_BIN)
#   A BIN named hyper_floor (bench/hyper_floor.rs, `cargo build --release
#   --example hyper_floor`) is run as the bare-hyper floor instead of authgate;
#   the words `nginx` and `haproxy` count the peers of dataplane.sh, configured
#   the same way (nginx as one process: master_process off).
# Environment: DURATION=5 CONNECTIONS=64 PORT_BASE=18900 KEEP=1 (keep the
#   callgrind.out files: callgrind_annotate shows where the instructions go),
#   CALLGRIND_OPTS (extra valgrind options, e.g. "--cache-sim=yes" to count
#   simulated cache misses per function as well).
# Output: one line per binary on stdout, and $RESULTS_DIR/instructions.md.
# Needs: valgrind (Debian package), plus what setup.sh installs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
PORT_BASE=${PORT_BASE:-18900}
UP_PORT=$((PORT_BASE + 1))
AG_PORT=$((PORT_BASE + 2))
BINS=("$@")
((${#BINS[@]})) || BINS=("$AUTHGATE_BIN")

"$BENCH_DIR/setup.sh" >&2
if ! command -v valgrind >/dev/null 2>&1; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get install -y -qq valgrind >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq valgrind; } >/dev/null 2>&1 \
        || die "valgrind is needed (apt-get install valgrind)"
fi
for b in "${BINS[@]}"; do [[ $b == nginx || $b == haproxy || -x $b ]] || die "no binary at $b (cargo build --release [--example hyper_floor])"; done
for p in $UP_PORT $AG_PORT; do port_free "$p" || die "port $p is in use (set PORT_BASE)"; done

install_traps $((${#BINS[@]} * (DURATION + 120) + 60))
RUN_DIR=$(mktemp -d /tmp/authgate-instr.XXXXXX)
mkdir -p "$RESULTS_DIR"
start_upstream "$UP_PORT"
write_authgate_config "$RUN_DIR/ag.toml" "$AG_PORT" "$UP_PORT" 1 static

URL="http://127.0.0.1:$AG_PORT/api/bench"
report=()
for bin in "${BINS[@]}"; do
    out=$RUN_DIR/callgrind.out
    rm -f "$out"*
    cmd=("$bin" run --config "$RUN_DIR/ag.toml")
    case $bin in
    nginx)
        nginx_proxy_conf "$AG_PORT" "$UP_PORT"
        cmd=("$NGINX_BIN" -p "$RUN_DIR/nginx" -e "$RUN_DIR/nginx/logs/error.log"
            -c "$RUN_DIR/nginx/nginx.conf" -g 'daemon off; master_process off;') ;;
    haproxy)
        haproxy_conf "$AG_PORT" "$UP_PORT"
        cmd=("$HAPROXY_BIN" -db -f "$RUN_DIR/haproxy/haproxy.cfg") ;;
    */hyper_floor | hyper_floor)
        cmd=("$bin" "127.0.0.1:$AG_PORT" "127.0.0.1:$UP_PORT" /api) ;;
    esac
    BENCH_TOKEN=static RUST_LOG=warn taskset -c "$PROXY_CPU" \
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" ${CALLGRIND_OPTS:-} \
        "${cmd[@]}" 2>"$RUN_DIR/valgrind.log" &
    pid=$!
    track "$pid"
    wait_port "$AG_PORT" "$pid" 60 || { cat "$RUN_DIR/valgrind.log" >&2; die "$bin did not start under valgrind"; }
    # Warm-up: connections to the upstream made, caches filled; not counted.
    taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d2s "$URL" >/dev/null
    callgrind_control -i on "$pid" >/dev/null 2>&1
    n=$(taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$URL" | awk '/requests in/ {print $1}')
    callgrind_control -i off "$pid" >/dev/null 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1
    stop_pid "$pid"
    ir=$(awk '/^totals:/ {print $2}' "$out".1)
    [[ -n $n && $n -gt 0 && -n $ir ]] || die "no measurement for $bin"
    per=$((ir / n))
    line="$bin: $n requests, $per instructions per request"
    echo "$line"
    report+=("| \`$bin\` | $n | $per |")
    if [[ -n ${KEEP:-} ]]; then cp "$out".1 "$RESULTS_DIR/callgrind.$(basename "$bin").out"; fi
done

{
    echo "# Instructions per request (callgrind)"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); authgate $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- wrk -t1 -c$CONNECTIONS -d${DURATION}s after a 2 s warm-up; user space only"
    echo
    echo "| binary | requests | instructions/request |"
    echo "|---|---:|---:|"
    printf '%s\n' "${report[@]}"
} >"$RESULTS_DIR/instructions.md"
