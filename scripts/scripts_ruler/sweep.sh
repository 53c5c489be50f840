#!/bin/sh
# RULER sweep: several methods x budgets on one model in ONE run (each prompt is prefilled once and
# decoded per method and budget; predictions equal one run each), then one table (methods x budgets,
# and per task).
#   sh scripts/scripts_ruler/sweep.sh [MODEL]      MODEL: smollm2 (default), tiny, a dir, a .gguf, a hub id
# Environment overrides:
#   METHODS          (default "FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm")
#   BUDGETS          max_capacity_prompts (default "64 128 256 512 1024"; tiny: "64 128 256")
#   CONTEXT_LENGTHS  (default 4096; tiny: 1024)     NUM_SAMPLES (default 50; tiny: 10)
#   TASKS            (default: RULER's 11 offline tasks; tiny: the needle tasks it was trained on)
#   WINDOW_SIZE      observation window (default 8)  BATCH (prompts per batch, default 4; tiny: 1)
#   ATTN, SAVE_ROOT (default ./; results in $SAVE_ROOT/results_ruler), NUM_THREADS, EXTRA_ARGS
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
. "$ROOT/scripts/lib.sh"  # default_attn
model_path=${1:-smollm2}
methods=${METHODS:-FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm}
if [ "$model_path" = "tiny" ]; then
    budgets=${BUDGETS:-64 128 256}
    context_lengths=${CONTEXT_LENGTHS:-1024}
    num_samples=${NUM_SAMPLES:-10}
    tasks=${TASKS:-niah_single_1,niah_multikey_1,niah_multikey_2}
    batch=${BATCH:-1}
    num_threads=${NUM_THREADS:-1}
else
    budgets=${BUDGETS:-64 128 256 512 1024}
    context_lengths=${CONTEXT_LENGTHS:-4096}
    num_samples=${NUM_SAMPLES:-50}
    tasks=${TASKS:-default}
    batch=${BATCH:-4}
    num_threads=${NUM_THREADS:-}
fi
threads_flag=""
[ -n "$num_threads" ] && threads_flag="--num_threads $num_threads"
attn=${ATTN:-$(default_attn)}
save_dir=${SAVE_ROOT:-.}
save_dir=${save_dir%/}/results_ruler
# the results directory is named after the resolved model (smollm2 -> SmolLM2-135M-Instruct)
model_name=$("$PYTHON" -m pyramidkv.models "$model_path") || exit 2

# shellcheck disable=SC2086  # threads_flag and EXTRA_ARGS are lists of flags on purpose
"$PYTHON" "$ROOT/run_ruler.py" --method "$(echo $methods | tr ' ' ',')" --model_path "$model_path" \
    --max_capacity_prompts "$(echo $budgets | tr ' ' ',')" --attn_implementation "$attn" \
    --save_dir "$save_dir" --context_lengths "$context_lengths" --num_samples "$num_samples" \
    --tasks "$tasks" --window_size "${WINDOW_SIZE:-8}" --eval_batch_size "$batch" $threads_flag $EXTRA_ARGS

for budget in $budgets; do
    if [ -d "$save_dir/${model_name}_$budget" ]; then
        "$PYTHON" "$ROOT/eval.py" --results_dir "$save_dir/${model_name}_$budget" >/dev/null
    fi
done
"$PYTHON" "$ROOT/scripts/scripts_ruler/sweep_table.py" --results_root "$save_dir" --model_name "$model_name" \
    --budgets "$(echo $budgets | tr ' ' ',')" --methods "$(echo $methods | tr ' ' ',')"
