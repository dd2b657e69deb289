#!/usr/bin/env bash
# bench/pgo.sh — a profile-guided release build of authgate.
#
# Why: under callgrind's cache simulation authgate takes about 2.5 times nginx's
# L1 instruction-cache misses per proxied request (BENCHMARKS.md, "Where the time
# goes"): its hot path is spread over many functions of a large binary. A profile
# tells LLVM which code is hot, so it lays hot code out together and moves cold
# branches away. The source is the same; only the build differs.
#
# Steps (all on loopback, bounded in time):
#   1. build authgate instrumented (-Cprofile-generate) into target/pgo-generate;
#   2. train it on what a deployment runs, not only on the benchmark's path: GET
#      and POST bursts through a static-key route and an OAuth route (the mock IdP
#      of dataplane.sh) to the nginx upstream; then callers over TLS to upstreams
#      over TLS, HTTP/1.1 and h2. Code the training never runs is taken for cold
#      and optimised for size, so a profile of plaintext alone would slow TLS down;
#   3. merge the profiles with llvm-profdata (rustup component llvm-tools,
#      installed here when missing);
#   4. build again with -Cprofile-use into target/pgo:
#      target/pgo/<host triple>/release/authgate.
# `--target` keeps the flags off build scripts and proc macros, which would
# otherwise write profiles of the compiler's own runs.
#
# Usage: bench/pgo.sh             (about twice a release build, plus ~40 s)
# Environment: PGO_DIR (default target/pgo-data), TRAIN_SECONDS (default 8 per
#   phase), PORT_BASE (default 18950). The result is printed on the last line.
# Needs: what setup.sh installs (openssl included), and rustup for llvm-tools.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TRAIN_SECONDS=${TRAIN_SECONDS:-8}
PORT_BASE=${PORT_BASE:-18950}
PGO_DIR=${PGO_DIR:-$REPO_DIR/target/pgo-data}
UP_PORT=$((PORT_BASE + 1))
AG_PORT=$((PORT_BASE + 2))
IDP_PORT=$((PORT_BASE + 3))
TLS_PORT=$((PORT_BASE + 4))
H2_PORT=$((PORT_BASE + 5))

"$BENCH_DIR/setup.sh" >&2
for p in $UP_PORT $AG_PORT $IDP_PORT $TLS_PORT $H2_PORT; do
    port_free "$p" || die "port $p is in use (set PORT_BASE to another range)"
done

# llvm-profdata must come from the same LLVM as rustc: rustup's llvm-tools.
sysroot=$(rustc --print sysroot)
host=$HOST_TRIPLE
[[ -n $host ]] || die "rustc is needed (it names the host triple)"
PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
    log "installing rustup component llvm-tools (for llvm-profdata)"
    rustup component add llvm-tools >&2 || die "rustup component add llvm-tools failed"
fi
[[ -x $PROFDATA ]] || die "llvm-profdata not found at $PROFDATA"

install_traps 3600
raise_nofile
RUN_DIR=$(mktemp -d /tmp/authgate-pgo.XXXXXX)
rm -rf "$PGO_DIR" && mkdir -p "$PGO_DIR/raw"

log "1/4 instrumented build (target/pgo-generate)"
(cd "$REPO_DIR" && RUSTFLAGS="-Cprofile-generate=$PGO_DIR/raw" \
    cargo build --release --locked --bin authgate --target "$host" --target-dir target/pgo-generate) >&2
AUTHGATE_BIN=$REPO_DIR/target/pgo-generate/$host/release/authgate

# The profile is written when the process exits normally: SIGTERM and wait,
# never lib.sh's stop_pid, which kills a process that takes more than 3 s.
stop_trained() {
    kill -TERM "$PROXY_PID"
    wait "$PROXY_PID" 2>/dev/null || true
}

log "2/4 training run (${TRAIN_SECONDS}s per phase)"
start_upstream "$UP_PORT"
start_idp "$IDP_PORT"
cat >"$RUN_DIR/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 512)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
for grant in static client_credentials; do
    write_authgate_config "$RUN_DIR/ag-$grant.toml" "$AG_PORT" "$UP_PORT" 1 "$grant" "$IDP_PORT"
    start_authgate "$RUN_DIR/ag-$grant.toml" "$AG_PORT" "$PROXY_CPU"
    expect_200 "the $grant route" "http://127.0.0.1:$AG_PORT/api/train"
    taskset -c "$WRK_CPU" wrk -t1 -c64 -d"${TRAIN_SECONDS}s" "http://127.0.0.1:$AG_PORT/api/train" >/dev/null
    taskset -c "$WRK_CPU" wrk -t1 -c16 -d"$((TRAIN_SECONDS / 2))s" -s "$RUN_DIR/post.lua" \
        "http://127.0.0.1:$AG_PORT/api/train" >/dev/null
    stop_trained
done
# TLS on both sides: a throwaway CA and a certificate for 127.0.0.1 signed by it,
# trusted by the routes (`ca`) and not checked by wrk; nginx answers over HTTP/1.1 on one port and
# h2 (ALPN) on the other.
tls=$RUN_DIR/tls
mkdir -p "$tls/logs"
{
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=authgate-pgo-ca -keyout "$tls/ca-key.pem" -out "$tls/ca.pem" &&
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj /CN=127.0.0.1 -keyout "$tls/key.pem" -out "$tls/leaf.csr" &&
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$tls/ext.cnf" &&
        openssl x509 -req -in "$tls/leaf.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca-key.pem" \
            -CAcreateserial -days 2 -extfile "$tls/ext.cnf" -out "$tls/cert.pem"
} >/dev/null 2>&1 || die "openssl could not make the certificates"
cat >"$tls/nginx.conf" <<CONF
worker_processes 1;
pid $tls/nginx.pid;
error_log $tls/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 10000000;
    ssl_certificate $tls/cert.pem;
    ssl_certificate_key $tls/key.pem;
    server { listen 127.0.0.1:$TLS_PORT ssl; location / { return 200 "ok"; } }
    server { listen 127.0.0.1:$H2_PORT ssl http2; location / { return 200 "ok"; } }
}
CONF
taskset -c "$UPSTREAM_CPU" "$NGINX_BIN" -p "$tls" -e "$tls/logs/error.log" -c "$tls/nginx.conf" -g 'daemon off;' &
track $!
wait_port "$H2_PORT" $! || die "TLS upstream did not start (see $tls/logs/error.log)"
cat >"$RUN_DIR/ag-tls.toml" <<CONF
[listen]
addr = "127.0.0.1:$AG_PORT"
tls_cert = "$tls/cert.pem"
tls_key = "$tls/key.pem"

[runtime]
worker_threads = 1

[store]
kind = "memory"

[providers.p]
grant = "static"
token_env = "BENCH_TOKEN"

[[routes]]
prefix = "/h1"
upstream = "https://127.0.0.1:$TLS_PORT"
provider = "p"
ca = "$tls/ca.pem"

[[routes]]
prefix = "/h2"
upstream = "https://127.0.0.1:$H2_PORT"
provider = "p"
ca = "$tls/ca.pem"
CONF
start_authgate "$RUN_DIR/ag-tls.toml" "$AG_PORT" "$PROXY_CPU"
for route in h1 h2; do
    expect_200 "the TLS route /$route (see $RUN_DIR/ag-tls.toml.log)" \
        "https://127.0.0.1:$AG_PORT/$route/train" -k
    taskset -c "$WRK_CPU" wrk -t1 -c32 -d"$((TRAIN_SECONDS / 2))s" "https://127.0.0.1:$AG_PORT/$route/train" >/dev/null
done
stop_trained

ls "$PGO_DIR"/raw/*.profraw >/dev/null 2>&1 || die "the training run wrote no profile"

log "3/4 merging profiles"
"$PROFDATA" merge -o "$PGO_DIR/authgate.profdata" "$PGO_DIR"/raw/*.profraw

log "4/4 optimised build (target/pgo)"
(cd "$REPO_DIR" && RUSTFLAGS="-Cprofile-use=$PGO_DIR/authgate.profdata" \
    cargo build --release --locked --bin authgate --target "$host" --target-dir target/pgo) >&2
echo "$PGO_BUILT_BIN"
