#!/bin/sh
# RULER sweep: several methods x budgets on one model, then one table (methods rows, budgets columns,
# average over tasks per context length).
#   sh scripts/scripts_ruler/sweep.sh [MODEL_PATH]
# Environment overrides:
#   METHODS          (default "FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm")
#   BUDGETS          (default "64 128 256"; max_capacity_prompts)
#   CONTEXT_LENGTHS, NUM_SAMPLES, TASKS, ATTN, SAVE_ROOT (default ./), EXTRA_ARGS,
#   NUM_THREADS (torch CPU threads; default 1 for the tiny embedded model, torch's default otherwise)
# With the embedded tiny checkpoint the defaults are 1024 tokens, 10 samples and the needle tasks it
# was trained on (niah_single_1, niah_multikey_1, niah_multikey_2); with a model passed as $1,
# 4096 tokens, 100 samples and RULER's 11 offline tasks.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
methods=${METHODS:-FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm}
budgets=${BUDGETS:-64 128 256}
if [ -n "$1" ]; then
    model_path=$1
    context_lengths=${CONTEXT_LENGTHS:-4096}
    num_samples=${NUM_SAMPLES:-100}
    tasks=${TASKS:-default}
    num_threads=${NUM_THREADS:-}
else
    model_path=$ROOT/ckpt/pyramidkv-tiny-llama
    if [ ! -f "$model_path/config.json" ]; then
        echo "error: the embedded checkpoint is missing at $model_path (train it with scripts/train_tiny_model.py) or pass a model path as \$1" >&2
        exit 2
    fi
    context_lengths=${CONTEXT_LENGTHS:-1024}
    num_samples=${NUM_SAMPLES:-10}
    tasks=${TASKS:-niah_single_1,niah_multikey_1,niah_multikey_2}
    num_threads=${NUM_THREADS:-1}
fi
threads_flag=""
[ -n "$num_threads" ] && threads_flag="--num_threads $num_threads"
if [ -n "$ATTN" ]; then
    attn=$ATTN
elif "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then
    attn=flash_attention_2
else
    attn=sdpa
fi
save_dir=${SAVE_ROOT:-.}
save_dir=${save_dir%/}/results_ruler
model_name=$(basename "$model_path")

first_budget=""
for budget in $budgets; do
    [ -z "$first_budget" ] && first_budget=$budget
    for method in $methods; do
        # FullKV keeps every token: one run (under the first budget) serves every column
        if [ "$(echo "$method" | tr 'A-Z' 'a-z')" = "fullkv" ] && [ "$budget" != "$first_budget" ]; then
            continue
        fi
        echo "== $method, budget $budget" >&2
        # shellcheck disable=SC2086  # threads_flag and EXTRA_ARGS are lists of flags on purpose
        "$PYTHON" "$ROOT/run_ruler.py" --method "$method" --model_path "$model_path" \
            --max_capacity_prompts "$budget" --attn_implementation "$attn" --save_dir "$save_dir" \
            --context_lengths "$context_lengths" --num_samples "$num_samples" --tasks "$tasks" $threads_flag $EXTRA_ARGS
    done
    "$PYTHON" "$ROOT/eval.py" --results_dir "$save_dir/${model_name}_$budget" >/dev/null
done

"$PYTHON" "$ROOT/scripts/scripts_ruler/sweep_table.py" --results_root "$save_dir" --model_name "$model_name" \
    --budgets "$(echo $budgets | tr ' ' ',')" --methods "$(echo $methods | tr ' ' ',')"
