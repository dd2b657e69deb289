#!/usr/bin/env bash
# bench/instructions.sh — user-space instructions per proxied request, under callgrind.
#
# req/s on a shared two-core VM moves by ±15 % from one minute to the next; an
# instruction count does not. This runs authgate (worker_threads = 1, static token)
# under valgrind's callgrind in front of the same nginx upstream as dataplane.sh,
# switches instrumentation on only for the measured wrk run (start-up and warm-up
# excluded), and divides. Kernel time (about two thirds of the CPU per request,
# loopback TCP) is not counted: this is the number our own code can move.
# It also counts locked instructions (atomic read-modify-writes: reference
# counts, wakers, mutexes), which callgrind counts as one instruction each but
# which cost the CPU a full memory barrier, and the proxy's threads.
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
#   COUNT=syscalls counts system calls per request instead, by kind (perf's
#   syscall tracepoints; no valgrind, so the binaries run at full speed): the
#   kernel's share of the CPU, the larger one, follows from these.
# Output: one line per binary on stdout, and $RESULTS_DIR/instructions.md (or
#   syscalls.md).
# Needs: valgrind (Debian package) or, for COUNT=syscalls, perf (linux-perf) and
#   root; plus what setup.sh installs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-64}
PORT_BASE=${PORT_BASE:-18900}
UP_PORT=$((PORT_BASE + 1))
AG_PORT=$((PORT_BASE + 2))
BINS=("$@")
((${#BINS[@]})) || BINS=("$AUTHGATE_BIN")

COUNT=${COUNT:-instructions}
[[ $COUNT == instructions || $COUNT == syscalls ]] || die "COUNT is instructions or syscalls"
if [[ $COUNT == instructions ]]; then
    "$BENCH_DIR/setup.sh" valgrind >&2
else
    "$BENCH_DIR/setup.sh" perf=linux-perf >&2
    # Every syscall, then the ones a proxy makes per request, where the kernel has them.
    EVENTS=raw_syscalls:sys_enter
    for s in read readv recvfrom recvmsg write writev sendto sendmsg epoll_wait epoll_pwait epoll_ctl getsockopt setsockopt clock_gettime futex; do
        [[ -d /sys/kernel/tracing/events/syscalls/sys_enter_$s ]] && EVENTS+=",syscalls:sys_enter_$s"
    done
    perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1 \
        || die "perf cannot read syscall tracepoints here (run as root, or lower kernel.perf_event_paranoid)"
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
    # Under callgrind with instrumentation off until the measured run (with
    # --collect-bus for the locked instructions); natively when counting syscalls.
    wrap=(valgrind --tool=callgrind --instr-atstart=no --collect-bus=yes
        --callgrind-out-file="$out" ${CALLGRIND_OPTS:-})
    [[ $COUNT == syscalls ]] && wrap=()
    BENCH_TOKEN=static RUST_LOG=warn taskset -c "$PROXY_CPU" \
        ${wrap[@]+"${wrap[@]}"} "${cmd[@]}" 2>"$RUN_DIR/proxy.log" &
    pid=$!
    track "$pid"
    wait_port "$AG_PORT" "$pid" 60 || { cat "$RUN_DIR/proxy.log" >&2; die "$bin did not start"; }
    # Warm-up: connections to the upstream made, caches filled; not counted.
    taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d2s "$URL" >/dev/null
    if [[ $COUNT == syscalls ]]; then
        # perf counts the proxy's processes (all their threads) for as long as
        # the command after `--` runs: the measured wrk run and nothing else.
        n=$(perf stat -x, -e "$EVENTS" -p "$(tree_pids "$pid" | paste -sd,)" -o "$RUN_DIR/perf.csv" \
            -- taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$URL" | awk '/requests in/ {print $1}')
        stop_pid "$pid"
        [[ -n $n && $n -gt 0 ]] || die "no measurement for $bin"
        # "count,unit,event,...": per request, by event; under 0.005 per request left out.
        counts=$(awk -F, -v n="$n" '$1 ~ /^[0-9]+$/ && $1 / n >= 0.005 {
            e = $3; sub(/.*sys_enter_?/, "", e); if (e == "") e = "all"
            printf "%s %.2f; ", e, $1 / n }' "$RUN_DIR/perf.csv")
        echo "$bin: $n requests; syscalls per request: ${counts%; }"
        report+=("| \`$bin\` | $n | ${counts%; } |")
        continue
    fi
    callgrind_control -i on "$pid" >/dev/null 2>&1
    n=$(taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "$URL" | awk '/requests in/ {print $1}')
    callgrind_control -i off "$pid" >/dev/null 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1
    # glibc locks in malloc and around system calls only once a process has a
    # second thread, so the count of threads goes with the locked instructions.
    threads=$(find "/proc/$pid/task" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    stop_pid "$pid"
    # "events: Ir ... Ge" names the columns of "totals: ...".
    read -r ir ge < <(awk '/^events:/ { for (i = 2; i <= NF; i++) if ($i == "Ge") g = i }
        /^totals:/ { print $2, (g ? $g : 0) }' "$out".1)
    [[ -n $n && $n -gt 0 && -n $ir ]] || die "no measurement for $bin"
    per=$((ir / n))
    locked=$(awk -v g="$ge" -v n="$n" 'BEGIN { printf "%.1f", g / n }')
    echo "$bin: $n requests, $per instructions and $locked locked instructions per request, $threads threads"
    report+=("| \`$bin\` | $n | $per | $locked | $threads |")
    if [[ -n ${KEEP:-} ]]; then cp "$out".1 "$RESULTS_DIR/callgrind.$(basename "$bin").out"; fi
done

{
    if [[ $COUNT == syscalls ]]; then
        echo "# System calls per request (perf syscall tracepoints)"
    else
        echo "# Instructions per request (callgrind)"
    fi
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); authgate $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "- wrk -t1 -c$CONNECTIONS -d${DURATION}s after a 2 s warm-up"
    echo
    if [[ $COUNT == syscalls ]]; then
        echo "| binary | requests | per request (\`all\` = every syscall) |"
        echo "|---|---:|---|"
    else
        echo "| binary | requests | instructions/request (user space only) | locked instructions/request | threads |"
        echo "|---|---:|---:|---:|---:|"
    fi
    printf '%s\n' "${report[@]}"
} >"$RESULTS_DIR/$COUNT.md"
