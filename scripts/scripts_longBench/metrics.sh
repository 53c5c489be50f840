#!/bin/sh
# Score LongBench predictions only (no generation): writes results.json / results.csv, prints the table.
#   sh scripts/scripts_longBench/metrics.sh [RESULTS_DIR] [eval.py flags, e.g. --longbench_e]
#   RESULTS_DIR default: ./results_long_bench/SmolLM2-135M-Instruct_128 (eval.sh's default run)
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
results_dir=${1:-./results_long_bench/SmolLM2-135M-Instruct_128}
[ $# -gt 0 ] && shift
"$PYTHON" "$ROOT/eval.py" --results_dir "$results_dir" "$@"
