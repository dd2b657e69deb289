#!/usr/bin/env bash
# bench/audit.sh — what the audit log costs at the data-path benchmark's load:
# authgate-static (as in dataplane.sh: one worker thread on PROXY_CPU, wrk and the
# nginx upstream on WRK_CPU) with no audit log, and with one (a file, keyed HMAC
# chain, daily rotation), in alternating rounds. Then the writer alone:
# `examples/audit_writer` (lines per second it sustains).
#
# Environment (all optional):
#   DURATION=10 CONNECTIONS=64 THREADS=1 ROUNDS=3 WARMUP=2   wrk parameters
#   WRITER_LINES=1000000   lines for the writer-only measurement (0: skip it)
#   PORT_BASE=18900        ports PORT_BASE+1..+2 on 127.0.0.1
#   AUTHGATE_BIN, AUTHGATE_BUILD=0, RESULTS_DIR   as in dataplane.sh
# Output: $RESULTS_DIR/audit.md
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
WRITER_LINES=${WRITER_LINES:-1000000}
PORT_BASE=${PORT_BASE:-18900}
UP_PORT=$((PORT_BASE + 1))
AG_PORT=$((PORT_BASE + 2))

"$BENCH_DIR/setup.sh" >&2
for p in $UP_PORT $AG_PORT; do port_free "$p" || die "port $p is in use (set PORT_BASE)"; done
ensure_authgate || die "no authgate binary at $AUTHGATE_BIN (cargo build --release)"
install_traps $((ROUNDS * 2 * (DURATION + WARMUP + 20) + 300))
raise_nofile
RUN_DIR=$(mktemp -d /tmp/authgate-bench.XXXXXX)
mkdir -p "$RESULTS_DIR"
OUT=$RESULTS_DIR/audit.md
ROWS=$RUN_DIR/rows.txt
: >"$ROWS"
start_upstream "$UP_PORT"

field() { sed -n 's/^BENCH .*\b'"$2"'=\([0-9.]*\).*/\1/p' "$1"; }

measure() { # measure ROUND off|on
    local round=$1 mode=$2 cfg=$RUN_DIR/$2.toml out=$RUN_DIR/wrk-$1-$2.txt
    rm -f "$RUN_DIR"/audit.log*
    write_authgate_config "$cfg" "$AG_PORT" "$UP_PORT" 1 static
    if [[ $mode == on ]]; then
        printf 'bench-audit-chain-key\n' >"$RUN_DIR/audit.key"
        printf '\n[audit]\nfile = "%s/audit.log"\nkey_file = "%s/audit.key"\nrotate = "daily"\n' \
            "$RUN_DIR" "$RUN_DIR" >>"$cfg"
    fi
    start_authgate "$cfg" "$AG_PORT" "$PROXY_CPU"
    expect_200 "authgate ($mode)" "http://127.0.0.1:$AG_PORT/api/bench"
    local wrk=(timeout -k 5 $((DURATION + WARMUP + 30)) taskset -c "$WRK_CPU" wrk -t"$THREADS"
        -c"$CONNECTIONS" --latency -s "$BENCH_DIR/latency.lua" "http://127.0.0.1:$AG_PORT/api/bench")
    "${wrk[@]}" -d"$WARMUP"s >"$out.warmup" 2>&1 || die "wrk warm-up failed"
    local t0 u0 t1 u1
    read -r t0 u0 < <(cpu_ticks "$PROXY_PID")
    "${wrk[@]}" -d"$DURATION"s >"$out" 2>&1 || die "wrk failed: $(tail -3 "$out")"
    read -r t1 u1 < <(cpu_ticks "$PROXY_PID")
    stop_pid "$PROXY_PID"
    local req dur rps cpu_per lines="-"
    req=$(field "$out" requests); dur=$(field "$out" duration_us)
    rps=$(awk -v r="$req" -v d="$dur" 'BEGIN {printf "%.0f", r / (d / 1e6)}')
    cpu_per=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" -v r="$req" 'BEGIN {printf "%.1f", (b - a) / hz * 1e6 / r}')
    if [[ $mode == on ]]; then
        lines=$(cat "$RUN_DIR"/audit.log* | wc -l)
        # Every line must verify: the chain the benchmark wrote is whole.
        "$AUTHGATE_BIN" audit verify --config "$cfg" >"$RUN_DIR/verify.txt" \
            || die "audit verify failed: $(cat "$RUN_DIR/verify.txt")"
    fi
    echo "| $round | $mode | $rps | $(field "$out" p50) | $(field "$out" p99) | $cpu_per | $(field "$out" status_errors) | $lines |" >>"$ROWS"
    log "round $round audit $mode: $rps req/s, p99 $(field "$out" p99) µs, cpu $cpu_per µs/req, audit lines $lines"
}

for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2)); then measure "$r" off; measure "$r" on; else measure "$r" on; measure "$r" off; fi
done

WRITER=""
if ((WRITER_LINES > 0)); then
    ensure_built "$REPO_DIR/target/release/examples/audit_writer" "$REPO_DIR/target/release/examples/audit_writer" --example audit_writer \
        || die "cannot build examples/audit_writer"
    WRITER=$(taskset -c "$PROXY_CPU" "$REPO_DIR/target/release/examples/audit_writer" "$WRITER_LINES" "$RUN_DIR")
fi

{
    echo "# Audit log cost"
    echo
    machine_info
    echo "- wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s (warm-up ${WARMUP}s) against authgate-static, 1 worker thread; audit \`on\` = a file, HMAC chain, rotate daily"
    echo
    echo "| round | audit | req/s | p50 µs | p99 µs | CPU µs/req | non-2xx | audit lines (+ warm-up) |"
    echo "|---|---|---|---|---|---|---|---|"
    cat "$ROWS"
    if [[ -n $WRITER ]]; then
        echo
        echo "Writer alone (\`examples/audit_writer $WRITER_LINES\`, on PROXY_CPU):"
        echo
        echo '```'
        echo "$WRITER"
        echo '```'
    fi
    echo
    echo "- load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT"
log "done: $OUT"
cat "$OUT"
