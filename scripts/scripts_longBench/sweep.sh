#!/bin/sh
# LongBench sweep: several methods x budgets on one model in ONE run (each prompt is prefilled once and
# decoded per method and budget; predictions equal one run each), eval.py per budget, then one table
# (methods x budgets with the LongBench average, and per dataset) in
# $SAVE_ROOT/results_long_bench/sweep_{model}.md / .csv / .json.
#   sh scripts/scripts_longBench/sweep.sh [MODEL]     MODEL: smollm2 (default), tiny, a dir, a .gguf, a hub id
# Without data/LongBench the run uses the bundled smoke sample data/longbench_smoke (all 21 datasets,
# 38 samples): self-written text, NOT LongBench, and the table is titled so.
# Environment overrides:
#   METHODS   (default "FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm ChunkKV")
#   BUDGETS   max_capacity_prompts (default "128 512")
#   DATASETS  comma list or "all" (default all: the 21 LongBench v1 sets)
#   MAX_NUM_EXAMPLES  first N samples per dataset (default: all)
#   WINDOW_SIZE observation window (default 8)   BATCH prompts per batch (default 1)
#   ATTN, SAVE_ROOT (default ./), NUM_THREADS (default 1 for tiny, torch's choice otherwise), EXTRA_ARGS
# Time: tiny, 21 datasets, default methods and budgets: ~2 min on 2 CPU cores; smollm2: see the README.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
. "$ROOT/scripts/lib.sh"  # default_attn
model_path=${1:-smollm2}
methods=${METHODS:-FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm ChunkKV}
budgets=${BUDGETS:-128 512}
datasets=${DATASETS:-all}
if [ "$model_path" = "tiny" ]; then
    num_threads=${NUM_THREADS:-1}
else
    num_threads=${NUM_THREADS:-}
fi
threads_flag=""
[ -n "$num_threads" ] && threads_flag="--num_threads $num_threads"
examples_flag=""
[ -n "$MAX_NUM_EXAMPLES" ] && examples_flag="--max_num_examples $MAX_NUM_EXAMPLES"
attn=${ATTN:-$(default_attn)}
save_dir=${SAVE_ROOT:-.}
save_dir=${save_dir%/}/results_long_bench
# the results directory is named after the resolved model (smollm2 -> SmolLM2-135M-Instruct)
model_name=$("$PYTHON" -m pyramidkv.models "$model_path") || exit 2

# shellcheck disable=SC2086  # the *_flag variables and EXTRA_ARGS are lists of flags on purpose
"$PYTHON" "$ROOT/run_longbench.py" --method "$(echo $methods | tr ' ' ',')" --model_path "$model_path" \
    --max_capacity_prompts "$(echo $budgets | tr ' ' ',')" --attn_implementation "$attn" \
    --save_dir "$save_dir" --datasets "$datasets" --window_size "${WINDOW_SIZE:-8}" \
    --eval_batch_size "${BATCH:-1}" $threads_flag $examples_flag $EXTRA_ARGS

for budget in $budgets; do
    if [ -d "$save_dir/${model_name}_$budget" ]; then
        "$PYTHON" "$ROOT/eval.py" --results_dir "$save_dir/${model_name}_$budget" >/dev/null
    fi
done
"$PYTHON" "$ROOT/scripts/scripts_longBench/sweep_table.py" --results_root "$save_dir" --model_name "$model_name" \
    --budgets "$(echo $budgets | tr ' ' ',')" --methods "$(echo $methods | tr ' ' ',')"
