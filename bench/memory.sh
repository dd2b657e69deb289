#!/usr/bin/env bash
# bench/memory.sh — authgate memory and scale.
#
# Measures, on the same keep-alive upstream as dataplane.sh:
#   1. idle RSS right after start-up, and again after a short burst of traffic;
#   2. RSS and wrk p99 with IDLE_CONNS (10,000) idle keep-alive connections held
#      open by bench/idle_conns.py (each did one request first), next to the
#      same wrk run without them;
#   3. throughput (and p99, CPU/request) with [runtime] worker_threads = 1 and 2.
#
# Usage: bench/memory.sh            (needs the authgate binary)
#        bench/memory.sh --selftest (no authgate: runs 1–2 against the upstream
#                                    nginx itself, to check the harness works)
# Environment: DURATION=10 CONNECTIONS=64 IDLE_CONNS=10000 PORT_BASE=18800
#   PROXY_CPU WRK_CPU UPSTREAM_CPU SCALE_CPUS (CPUs for worker_threads = 2,
#   default all), AUTHGATE_BIN, AUTHGATE_BUILD=0, RESULTS_DIR,
#   MEMORY_LISTEN_EXTRA (extra [listen] lines for the 10k-connection config).
# Output: $RESULTS_DIR/memory.md and memory.csv (or memory-selftest.*).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SELFTEST=0
[[ ${1:-} == --selftest ]] && SELFTEST=1
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
IDLE_CONNS=${IDLE_CONNS:-10000}
PORT_BASE=${PORT_BASE:-18800}
SCALE_CPUS=${SCALE_CPUS:-0-$((NCPU - 1))}
# 10,000 idle connections must neither hit a connection cap nor be reaped as idle
# during the measurement.
MEMORY_LISTEN_EXTRA=${MEMORY_LISTEN_EXTRA:-'max_connections = 20000\nidle_timeout = "600s"'}
UP_PORT=$((PORT_BASE + 1))
AG_PORT=$((PORT_BASE + 2))

"$BENCH_DIR/setup.sh" >&2
for p in $UP_PORT $AG_PORT; do port_free "$p" || die "port $p is in use (set PORT_BASE)"; done
if ((!SELFTEST)) && ! ensure_authgate; then
    log "NOTE: authgate binary not found at $AUTHGATE_BIN — nothing to measure."
    log "      Build it (cargo build --release) or set AUTHGATE_BIN; 'bench/memory.sh --selftest'"
    log "      checks the harness against the upstream nginx alone."
    exit 2
fi

install_traps $((6 * (DURATION + 20) + 300))
raise_nofile
(($(ulimit -n) > IDLE_CONNS + 512)) || die "open-files limit $(ulimit -n) too low for $IDLE_CONNS connections"
RUN_DIR=$(mktemp -d /tmp/authgate-mem.XXXXXX)
mkdir -p "$RESULTS_DIR"
name=memory; ((SELFTEST)) && name=memory-selftest
CSV=$RESULTS_DIR/$name.csv
echo "metric,value,unit" >"$CSV"
record() { echo "$1,$2,$3" >>"$CSV"; log "$1 = $2 $3"; }

start_upstream "$UP_PORT"

# The process under test: authgate (worker_threads 1, static token) or, in
# self-test mode, the upstream nginx itself.
HDR=()
if ((SELFTEST)); then
    TARGET_PID=$UPSTREAM_PID; TARGET_PORT=$UP_PORT; URL_PATH=/bench
    HDR=(-H "Authorization: Bearer static")
else
    write_authgate_config "$RUN_DIR/ag1.toml" "$AG_PORT" "$UP_PORT" 1 static "" "$MEMORY_LISTEN_EXTRA"
    start_authgate "$RUN_DIR/ag1.toml" "$AG_PORT" "$PROXY_CPU"
    TARGET_PID=$PROXY_PID; TARGET_PORT=$AG_PORT; URL_PATH=/api/bench
fi

run_wrk() { # run_wrk SECONDS OUTFILE
    timeout -k 5 $(($1 + 30)) taskset -c "$WRK_CPU" wrk -t1 -c"$CONNECTIONS" -d"$1"s --latency \
        -s "$BENCH_DIR/latency.lua" ${HDR[@]+"${HDR[@]}"} "http://127.0.0.1:$TARGET_PORT$URL_PATH" >"$2" 2>&1 \
        || die "wrk failed: $(tail -3 "$2")"
    grep -q '^BENCH ' "$2" || die "no BENCH line in $2"
}
field() { sed -n 's/^BENCH .*\b'"$2"'=\([0-9.]*\).*/\1/p' "$1"; }
rps_of() { awk -v r="$(field "$1" requests)" -v d="$(field "$1" duration_us)" 'BEGIN {printf "%.0f", r / (d / 1e6)}'; }
errors_of() { echo $(($(field "$1" status_errors) + $(field "$1" connect_errors) + $(field "$1" read_errors) + $(field "$1" write_errors) + $(field "$1" timeouts))); }

# ---------------------------------------------------------------- 1. idle RSS
sleep 1
record idle_rss_startup "$(rss_kib "$TARGET_PID")" KiB
run_wrk 2 "$RUN_DIR/warm.txt"
sleep 1
record idle_rss_after_traffic "$(rss_kib "$TARGET_PID")" KiB

# ---------------------------------------------------------------- 2. 10k idle connections
run_wrk "$DURATION" "$RUN_DIR/base.txt"
record p99_without_idle_conns "$(field "$RUN_DIR/base.txt" p99)" us
record rps_without_idle_conns "$(rps_of "$RUN_DIR/base.txt")" req/s

IDLE_HDR=()
((SELFTEST)) && IDLE_HDR=(--header "Authorization: Bearer static")
taskset -c "$WRK_CPU" "$PYTHON" "$BENCH_DIR/idle_conns.py" --port "$TARGET_PORT" --path "$URL_PATH" \
    -n "$IDLE_CONNS" --hold $((DURATION + 120)) ${IDLE_HDR[@]+"${IDLE_HDR[@]}"} >"$RUN_DIR/idle.txt" 2>&1 &
IDLE_PID=$!
track "$IDLE_PID"
for _ in $(seq 1200); do
    grep -q '^READY' "$RUN_DIR/idle.txt" && break
    kill -0 "$IDLE_PID" 2>/dev/null || die "idle_conns.py died: $(tail -5 "$RUN_DIR/idle.txt")"
    sleep 0.1
done
grep -q '^READY' "$RUN_DIR/idle.txt" || die "idle connections not ready after 120 s"
log "$(grep '^READY' "$RUN_DIR/idle.txt")"
idle_ok=$(sed -n 's/^READY ok=\([0-9]*\).*/\1/p' "$RUN_DIR/idle.txt")
record idle_connections_open "$idle_ok" connections
sleep 2
record rss_with_idle_conns "$(rss_kib "$TARGET_PID")" KiB
run_wrk "$DURATION" "$RUN_DIR/loaded.txt"
record p99_with_idle_conns "$(field "$RUN_DIR/loaded.txt" p99)" us
record rps_with_idle_conns "$(rps_of "$RUN_DIR/loaded.txt")" req/s
record errors_with_idle_conns "$(errors_of "$RUN_DIR/loaded.txt")" count
record peak_rss_with_idle_conns "$(peak_rss_kib "$TARGET_PID")" KiB
stop_pid "$IDLE_PID"
log "$(grep '^DONE' "$RUN_DIR/idle.txt" || echo 'idle client: no DONE line')"

# ---------------------------------------------------------------- 3. worker threads 1 vs 2
if ((!SELFTEST)); then
    stop_pid "$TARGET_PID"
    for wt in 1 2; do
        cpus=$PROXY_CPU; ((wt > 1)) && cpus=$SCALE_CPUS
        write_authgate_config "$RUN_DIR/ag-wt$wt.toml" "$AG_PORT" "$UP_PORT" "$wt" static
        start_authgate "$RUN_DIR/ag-wt$wt.toml" "$AG_PORT" "$cpus"
        TARGET_PID=$PROXY_PID
        run_wrk 2 "$RUN_DIR/wt$wt-warm.txt"
        read -r t0 _ < <(cpu_ticks "$TARGET_PID")
        run_wrk "$DURATION" "$RUN_DIR/wt$wt.txt"
        read -r t1 _ < <(cpu_ticks "$TARGET_PID")
        req=$(field "$RUN_DIR/wt$wt.txt" requests)
        record "rps_worker_threads_$wt" "$(rps_of "$RUN_DIR/wt$wt.txt")" req/s
        record "p99_worker_threads_$wt" "$(field "$RUN_DIR/wt$wt.txt" p99)" us
        record "cpu_per_req_worker_threads_$wt" "$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" -v r="$req" 'BEGIN {printf "%.2f", (b - a) / hz * 1e6 / r}')" us
        record "errors_worker_threads_$wt" "$(errors_of "$RUN_DIR/wt$wt.txt")" count
        stop_pid "$TARGET_PID"
    done
fi

# ---------------------------------------------------------------- report
machine_info >"$RUN_DIR/info.txt"
"$PYTHON" - "$CSV" "$RESULTS_DIR/$name.md" "$SELFTEST" "$IDLE_CONNS" "$CONNECTIONS" "$DURATION" "$SCALE_CPUS" "$PROXY_CPU" "$RUN_DIR/info.txt" <<'PY'
import csv, sys
src, out, selftest, idle, conns, dur, scale_cpus, proxy_cpu, info = sys.argv[1:]
m = {r["metric"]: float(r["value"]) for r in csv.DictReader(open(src))}
mib = lambda k: f"{m[k] / 1024:.1f} MiB" if k in m else "–"
ms = lambda k: f"{m[k] / 1000:.2f} ms" if k in m else "–"
num = lambda k, u="": f"{m[k]:,.0f}{u}" if k in m else "–"
what = "the upstream nginx (self-test of the harness)" if selftest == "1" else "authgate (worker_threads = 1, static token)"
lines = [
    "# Memory and scale" + (" — SELF-TEST, not authgate" if selftest == "1" else ""), "",
    open(info).read().rstrip(), "",
    f"Process under test: {what}. wrk -t1 -c{conns} -d{dur}s. RSS is VmRSS (peak: VmHWM) from /proc.", "",
    "| measurement | value | target |", "|---|---:|---:|",
    f"| idle RSS after start-up | {mib('idle_rss_startup')} | < 20 MiB |",
    f"| idle RSS after a 2 s burst | {mib('idle_rss_after_traffic')} | < 20 MiB |",
    f"| idle keep-alive connections held | {num('idle_connections_open')} of {int(idle):,} | |",
    f"| RSS with them open | {mib('rss_with_idle_conns')} | < 100 MiB |",
    f"| peak RSS (whole run) | {mib('peak_rss_with_idle_conns')} | |",
    f"| p99 without / with idle connections | {ms('p99_without_idle_conns')} / {ms('p99_with_idle_conns')} | |",
    f"| req/s without / with idle connections | {num('rps_without_idle_conns')} / {num('rps_with_idle_conns')} | |",
    f"| errors during the loaded run | {num('errors_with_idle_conns')} | 0 |",
]
if "rps_worker_threads_1" in m:
    r1, r2 = m["rps_worker_threads_1"], m.get("rps_worker_threads_2", 0)
    lines += [
        "", "## Worker threads", "",
        f"worker_threads = 1 pinned to CPU {proxy_cpu}; worker_threads = 2 on CPUs {scale_cpus} "
        "(on a 2-core machine that CPU set is shared with wrk and the upstream, so the gain is bounded).", "",
        "| worker_threads | req/s | p99 | CPU µs/req | errors |", "|---:|---:|---:|---:|---:|",
    ]
    for wt in (1, 2):
        lines.append(f"| {wt} | {num(f'rps_worker_threads_{wt}')} | {ms(f'p99_worker_threads_{wt}')} "
                     f"| {m.get(f'cpu_per_req_worker_threads_{wt}', 0):.1f} | {num(f'errors_worker_threads_{wt}')} |")
    lines += ["", f"Scaling 1 → 2 threads: {r2 / r1:.2f}×."]
lines += ["", "Raw numbers: `" + src.rsplit("/", 1)[-1] + "`.", ""]
open(out, "w").write("\n".join(lines))
PY
log "done: $RESULTS_DIR/$name.md"
