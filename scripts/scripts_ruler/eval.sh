#!/bin/sh
# RULER prediction + scoring (PyramidKV-style positional arguments, all optional).
#   sh scripts/scripts_ruler/eval.sh [CUDA_DEVICES] [METHOD] [CAPACITY] [ATTN] [SAVE_ROOT] [MODEL_PATH]
#   $1 CUDA_VISIBLE_DEVICES (default 0)        $2 method (default PyramidKV): FullKV SnapKV PyramidKV
#   $3 max_capacity_prompts (default 128)         H2O StreamingLLM L2Norm
#   $4 attn_implementation (default flash_attention_2 if flash-attn is importable, else sdpa)
#   $5 save root (default ./; results go to $5/results_ruler)
#   $6 model_path (default: the embedded ckpt/pyramidkv-tiny-llama)
# Environment overrides: CONTEXT_LENGTHS (comma list), NUM_SAMPLES, TASKS (comma list), EXTRA_ARGS,
# NUM_THREADS (torch CPU threads; default 1 for the tiny embedded model, where one thread decodes
# fastest, torch's own default for a model passed as $6).
# Defaults: with the embedded tiny checkpoint (trained on ~1k-token needle tasks) 1024 tokens and 20
# samples per task (1-2 minutes on a 2-core CPU); with a model passed as $6 RULER's 4096 tokens and
# 100 samples.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}

export CUDA_VISIBLE_DEVICES=${1:-0}
method=${2:-PyramidKV}
max_capacity_prompts=${3:-128}
if [ -n "$4" ]; then
    attn_implementation=$4
elif "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then
    attn_implementation=flash_attention_2
else
    attn_implementation=sdpa
fi
source_path=${5:-./}
if [ -n "$6" ]; then
    model_path=$6
    context_lengths=${CONTEXT_LENGTHS:-4096}
    num_samples=${NUM_SAMPLES:-100}
    num_threads=${NUM_THREADS:-}
else
    model_path=$ROOT/ckpt/pyramidkv-tiny-llama
    if [ ! -f "$model_path/config.json" ]; then
        echo "error: the embedded checkpoint is missing at $model_path (train it with scripts/train_tiny_model.py) or pass a model path as \$6" >&2
        exit 2
    fi
    context_lengths=${CONTEXT_LENGTHS:-1024}
    num_samples=${NUM_SAMPLES:-20}
    num_threads=${NUM_THREADS:-1}
fi
threads_flag=""
[ -n "$num_threads" ] && threads_flag="--num_threads $num_threads"
tasks=${TASKS:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe}
save_dir=${source_path%/}/results_ruler
results_dir=$save_dir/$(basename "$model_path")_$max_capacity_prompts

# shellcheck disable=SC2086  # threads_flag and EXTRA_ARGS are lists of flags on purpose
"$PYTHON" "$ROOT/run_ruler.py" \
    --method "$method" \
    --model_path "$model_path" \
    --max_capacity_prompts "$max_capacity_prompts" \
    --attn_implementation "$attn_implementation" \
    --save_dir "$save_dir" \
    --context_lengths "$context_lengths" \
    --num_samples "$num_samples" \
    --tasks "$tasks" \
    $threads_flag $EXTRA_ARGS

"$PYTHON" "$ROOT/eval.py" --results_dir "$results_dir"
