#!/usr/bin/env bash
# bench/run_all.sh — every benchmark in sequence (about 5 minutes with the defaults):
# data path, memory and scale, seed scenario. Results land in bench/results/.
# Each script bounds its own runtime and stops every process it started.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$BENCH_DIR/setup.sh"
"$BENCH_DIR/dataplane.sh"
"$BENCH_DIR/memory.sh"
timeout 300 python3 "$BENCH_DIR/seed_scenario.py"
echo "results: $BENCH_DIR/results/{dataplane,memory,seed}.md"
