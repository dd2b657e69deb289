#!/usr/bin/env bash
# bench/setup.sh — install the benchmark prerequisites from Debian packages.
#
# Idempotent: packages already present are not reinstalled, and `apt-get update`
# runs only when something is missing. Needs root (or sudo). Used by operators and
# by the bench scripts themselves; CI tests do not depend on it.
#
# Packages (Debian 12 "bookworm" versions at the time of writing):
#   wrk 4.1.0, nginx-light 1.22.1 (falls back to nginx), haproxy 2.6.12,
#   python3 (stdlib only), procps/util-linux (taskset, ps), curl, openssl —
#   usually present.
# Usage: setup.sh [COMMAND[=PACKAGE] ...]   also these tools, for the scripts that
#   need more (instructions.sh: valgrind, or perf=linux-perf).
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }

have_cmd wrk     || need+=(wrk)
have_cmd haproxy || [[ -x /usr/sbin/haproxy ]] || need+=(haproxy)
have_cmd nginx   || [[ -x /usr/sbin/nginx ]]   || need+=(nginx)
have_cmd taskset || need+=(util-linux)
have_cmd python3 || need+=(python3)
have_cmd curl    || need+=(curl)      # probes: does a target answer 200?
have_cmd openssl || need+=(openssl)   # pgo.sh: certificates for its TLS training
for extra in "$@"; do
    have_cmd "${extra%%=*}" || need+=("${extra#*=}")
done

if ((${#need[@]} == 0)); then
    echo "setup: all prerequisites present"
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    have_cmd sudo || { echo "setup: need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup: installing: ${need[*]}"
$SUDO apt-get update -qq
pkgs=()
for p in "${need[@]}"; do
    if [[ $p == nginx ]]; then
        # nginx-light is the smallest build with proxy + upstream keepalive;
        # newer Debian releases dropped it in favour of plain `nginx`.
        if apt-cache show nginx-light >/dev/null 2>&1; then p=nginx-light; fi
    fi
    pkgs+=("$p")
done
$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}"

# The packages' own services are not wanted: the bench starts its own instances
# on private loopback ports. Stop them where an init system started them.
for svc in nginx haproxy; do
    if have_cmd systemctl && systemctl is-active --quiet "$svc" 2>/dev/null; then
        $SUDO systemctl stop "$svc" || true
    elif have_cmd service; then
        $SUDO service "$svc" stop >/dev/null 2>&1 || true
    fi
done
echo "setup: done"
