#!/usr/bin/env bash
# bench/dataplane.sh — data-path benchmark: direct vs nginx vs HAProxy vs authgate.
#
# One keep-alive upstream (nginx, 1 worker) answers 200 "ok" when an
# Authorization header is present. In front of it, one proxy at a time, each on
# the same single CPU (PROXY_CPU) with one worker/thread:
#   direct            wrk → upstream (sends the header itself): the ceiling
#   nginx             proxy_pass + proxy_set_header Authorization, upstream keepalive
#   haproxy           nbthread 1, http-request set-header Authorization, http-reuse
#   authgate-static   [runtime] worker_threads = 1, grant = "static"
#   authgate-oauth    same, grant = "client_credentials" against bench/mock_idp.py
#   authgate-pgo      authgate-static, built by bench/pgo.sh (profile-guided): the
#                     same source, its hot code laid out together (skipped with a
#                     note when bench/pgo.sh has not been run)
#   hyper-floor       bench/hyper_floor.rs: hyper's server and client with nothing
#                     of authgate's between them (no pool, routing, hygiene,
#                     metrics): the least any hyper-based proxy costs
# Targets are measured in alternating rounds (the order rotates every round) so
# slow drift of the machine hits all of them alike. Each measurement starts the
# proxy fresh, warms it up, then runs wrk on WRK_CPU.
#
# Environment (all optional):
#   DURATION=10 CONNECTIONS=64 THREADS=1 ROUNDS=3 WARMUP=2   wrk parameters
#   TARGETS="direct nginx haproxy authgate-static authgate-oauth authgate-pgo hyper-floor"
#   PORT_BASE=18700        ports PORT_BASE+1..+8 on 127.0.0.1
#   PROXY_CPU WRK_CPU UPSTREAM_CPU   CPU pinning (see lib.sh for defaults)
#   AUTHGATE_BIN           default target/release/authgate (built if missing)
#   HYPER_FLOOR_BIN        default target/release/examples/hyper_floor (built if missing)
#   AUTHGATE_PGO_BIN       default target/pgo/<host>/release/authgate (bench/pgo.sh)
#   AUTHGATE_BUILD=0       never run cargo; skip authgate/hyper-floor rows when missing
#   RESULTS_DIR            default bench/results
# Output: $RESULTS_DIR/dataplane.md, dataplane.csv, dataplane_latency.csv,
#         dataplane_latency.svg
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
PORT_BASE=${PORT_BASE:-18700}
read -r -a TARGETS <<<"${TARGETS:-direct nginx haproxy authgate-static authgate-oauth authgate-pgo hyper-floor}"

UP_PORT=$((PORT_BASE + 1))
NGINX_PORT=$((PORT_BASE + 2))
HAPROXY_PORT=$((PORT_BASE + 3))
AG_STATIC_PORT=$((PORT_BASE + 4))
AG_OAUTH_PORT=$((PORT_BASE + 5))
IDP_PORT=$((PORT_BASE + 6))
FLOOR_PORT=$((PORT_BASE + 7))
AG_PGO_PORT=$((PORT_BASE + 8))

# ---------------------------------------------------------------- preflight
"$BENCH_DIR/setup.sh" >&2
for p in $UP_PORT $NGINX_PORT $HAPROXY_PORT $AG_STATIC_PORT $AG_OAUTH_PORT $IDP_PORT $FLOOR_PORT $AG_PGO_PORT; do
    port_free "$p" || die "port $p is in use (set PORT_BASE to another range)"
done

# has_target GLOB: some target matches.  drop_targets GLOB: removes the matches.
has_target() {
    local t
    for t in "${TARGETS[@]}"; do [[ $t == $1 ]] && return 0; done
    return 1
}
drop_targets() {
    local kept=() t
    for t in "${TARGETS[@]}"; do [[ $t == $1 ]] || kept+=("$t"); done
    TARGETS=(${kept[@]+"${kept[@]}"})
}

# Drop rows, loudly, whose binary is missing and could not be built. The
# authgate-pgo row runs its own binary, so it does not depend on this one.
if { has_target authgate-static || has_target authgate-oauth; } && ! ensure_authgate; then
    log "NOTE: authgate binary not found at $AUTHGATE_BIN — skipping the authgate-static and authgate-oauth rows."
    log "      Build it (cargo build --release) or set AUTHGATE_BIN, then re-run."
    drop_targets authgate-static
    drop_targets authgate-oauth
fi
if has_target hyper-floor && ! ensure_hyper_floor; then
    log "NOTE: $HYPER_FLOOR_BIN not found — skipping the hyper-floor row."
    log "      Build it (cargo build --release --example hyper_floor) or set HYPER_FLOOR_BIN."
    drop_targets hyper-floor
fi
if has_target authgate-pgo && [[ ! -x $AUTHGATE_PGO_BIN ]]; then
    log "NOTE: $AUTHGATE_PGO_BIN not found — skipping the authgate-pgo row (run bench/pgo.sh)."
    drop_targets authgate-pgo
fi
((${#TARGETS[@]} > 0)) || die "nothing to measure"

# Bound the whole run: every measurement is warm-up + duration + start/stop slack.
MAX_SECONDS=$((ROUNDS * ${#TARGETS[@]} * (DURATION + WARMUP + 20) + 60))
install_traps "$MAX_SECONDS"
raise_nofile

RUN_DIR=$(mktemp -d /tmp/authgate-bench.XXXXXX)
mkdir -p "$RESULTS_DIR"
CSV=$RESULTS_DIR/dataplane.csv
PCT_CSV=$RESULTS_DIR/dataplane_latency.csv
INFO=$RESULTS_DIR/dataplane_info.txt
echo "round,target,requests,duration_s,rps,p50_us,p75_us,p90_us,p99_us,p999_us,max_us,status_errors,socket_errors,cpu_s,cpu_us_per_req,peak_rss_kib,user_us_per_req" >"$CSV"
echo "round,target,percentile,latency_us" >"$PCT_CSV"
{
    machine_info
    echo "- wrk: -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency, warm-up ${WARMUP}s, $ROUNDS rounds, order rotated per round"
    echo "- targets: ${TARGETS[*]}"
    if has_target authgate-pgo; then echo "- authgate-pgo: $AUTHGATE_PGO_BIN (built $(date -u -r "$AUTHGATE_PGO_BIN" +%Y-%m-%dT%H:%MZ))"; fi
} >"$INFO"
log "running ${TARGETS[*]} × $ROUNDS rounds of ${DURATION}s (bounded to ${MAX_SECONDS}s)"

start_upstream "$UP_PORT"
if has_target authgate-oauth; then start_idp "$IDP_PORT"; fi

# ---------------------------------------------------------------- one measurement
# start_target NAME: starts the proxy (sets PROXY_PID, PORT, URL_PATH, HDR).
start_target() {
    PROXY_PID=""; HDR=(); URL_PATH=/api/bench
    case $1 in
    direct)
        PORT=$UP_PORT; URL_PATH=/bench; HDR=(-H "Authorization: Bearer static") ;;
    nginx)
        PORT=$NGINX_PORT; start_nginx_proxy "$PORT" "$UP_PORT" ;;
    haproxy)
        PORT=$HAPROXY_PORT; start_haproxy "$PORT" "$UP_PORT" ;;
    authgate-static | authgate-pgo)
        # The same configuration; the PGO row differs only in its binary.
        local bin=$AUTHGATE_BIN
        PORT=$AG_STATIC_PORT
        [[ $1 == authgate-pgo ]] && PORT=$AG_PGO_PORT bin=$AUTHGATE_PGO_BIN
        write_authgate_config "$RUN_DIR/$1.toml" "$PORT" "$UP_PORT" 1 static
        AUTHGATE_BIN=$bin start_authgate "$RUN_DIR/$1.toml" "$PORT" "$PROXY_CPU" ;;
    authgate-oauth)
        PORT=$AG_OAUTH_PORT
        write_authgate_config "$RUN_DIR/ag-oauth.toml" "$PORT" "$UP_PORT" 1 client_credentials "$IDP_PORT"
        start_authgate "$RUN_DIR/ag-oauth.toml" "$PORT" "$PROXY_CPU" ;;
    hyper-floor)
        PORT=$FLOOR_PORT; start_hyper_floor "$PORT" "$UP_PORT" "$PROXY_CPU" ;;
    *) die "unknown target $1" ;;
    esac
}

run_wrk() { # run_wrk SECONDS OUTFILE
    timeout -k 5 $(($1 + 30)) taskset -c "$WRK_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$1"s \
        --latency -s "$BENCH_DIR/latency.lua" ${HDR[@]+"${HDR[@]}"} \
        "http://127.0.0.1:$PORT$URL_PATH" >"$2" 2>&1
}

# Pull key=value out of the BENCH line of a wrk output.
field() { sed -n 's/^BENCH .*\b'"$2"'=\([0-9.]*\).*/\1/p' "$1"; }

measure() { # measure ROUND TARGET
    local round=$1 t=$2 out=$RUN_DIR/wrk-$1-$2.txt
    start_target "$t"
    # Sanity: the route must answer 200 before we measure anything.
    expect_200 "$t" "http://127.0.0.1:$PORT$URL_PATH" ${HDR[@]+"${HDR[@]}"}
    run_wrk "$WARMUP" "$out.warmup" || die "wrk warm-up failed for $t: $(tail -3 "$out.warmup")"
    local pid=${PROXY_PID:-} t0=0 t1=0 u0=0 u1=0
    [[ -n $pid ]] && read -r t0 u0 < <(cpu_ticks "$pid")
    run_wrk "$DURATION" "$out" || die "wrk failed for $t: $(tail -3 "$out")"
    [[ -n $pid ]] && read -r t1 u1 < <(cpu_ticks "$pid")
    grep -q '^BENCH ' "$out" || die "no BENCH line in wrk output for $t (see $out)"

    local req dur rps cpu_s cpu_per user_per rss sock
    req=$(field "$out" requests); dur=$(field "$out" duration_us)
    sock=$(($(field "$out" connect_errors) + $(field "$out" read_errors) + $(field "$out" write_errors) + $(field "$out" timeouts)))
    rps=$(awk -v r="$req" -v d="$dur" 'BEGIN {printf "%.1f", r / (d / 1e6)}')
    if [[ -n $pid ]]; then
        cpu_s=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')
        cpu_per=$(awk -v c="$cpu_s" -v r="$req" 'BEGIN {printf "%.2f", r ? c * 1e6 / r : 0}')
        user_per=$(awk -v a="$u0" -v b="$u1" -v hz="$CLK_TCK" -v r="$req" 'BEGIN {printf "%.2f", r ? (b - a) / hz * 1e6 / r : 0}')
        rss=$(peak_rss_kib "$pid")
        stop_pid "$pid"
    else
        cpu_s=""; cpu_per=""; user_per=""; rss=""
    fi
    echo "$round,$t,$req,$(awk -v d="$dur" 'BEGIN {printf "%.3f", d / 1e6}'),$rps,$(field "$out" p50),$(field "$out" p75),$(field "$out" p90),$(field "$out" p99),$(field "$out" p999),$(field "$out" max),$(field "$out" status_errors),$sock,$cpu_s,$cpu_per,$rss,$user_per" >>"$CSV"
    sed -n 's/^BENCHPCT //p' "$out" | tr ',' '\n' | awk -F: -v r="$round" -v t="$t" '{print r "," t "," $1 "," $2}' >>"$PCT_CSV"
    log "round $round $t: ${rps} req/s, p99 $(field "$out" p99) µs, cpu ${cpu_s:--} s, peak rss ${rss:--} KiB, non-2xx $(field "$out" status_errors), socket errors $sock"
}

# ---------------------------------------------------------------- rounds
n=${#TARGETS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
        measure "$r" "${TARGETS[$(((i + r - 1) % n))]}"
    done
done

echo "- load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$INFO"
"$PYTHON" "$BENCH_DIR/summarize.py" --csv "$CSV" --info "$INFO" --out "$RESULTS_DIR/dataplane.md"
"$PYTHON" "$BENCH_DIR/plot.py" --csv "$PCT_CSV" --out "$RESULTS_DIR/dataplane_latency.svg"
log "done: $RESULTS_DIR/dataplane.md"
