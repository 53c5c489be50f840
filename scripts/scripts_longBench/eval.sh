#!/bin/sh
# LongBench prediction + scoring (PyramidKV-style positional arguments).
#   sh scripts/scripts_longBench/eval.sh CUDA_DEVICES METHOD [CAPACITY] [ATTN] [SAVE_ROOT] [MODEL_PATH]
#   $1 CUDA_VISIBLE_DEVICES (e.g. 0)         $2 method: FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm
#   $3 max_capacity_prompts (default 128)    $4 attn_implementation (default flash_attention_2 if
#   $5 save root (default ./; results go       flash-attn is importable, else sdpa)
#      to $5/results_long_bench)             $6 model_path (default: the embedded ckpt/pyramidkv-tiny-llama)
# Extra run_longbench.py flags can be passed through the environment: EXTRA_ARGS="--datasets qasper".
# NUM_THREADS (default 1) sets torch's CPU threads: one thread is fastest for the tiny embedded model;
# raise it for a large model on CPU (it does not matter on GPU).
# Without data/LongBench it runs on the bundled smoke sample data/longbench_smoke (NOT LongBench).
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}

if [ -z "$2" ]; then
    echo "usage: sh scripts/scripts_longBench/eval.sh CUDA_DEVICES METHOD [CAPACITY] [ATTN] [SAVE_ROOT] [MODEL_PATH]" >&2
    exit 2
fi
export CUDA_VISIBLE_DEVICES=$1
method=$2
max_capacity_prompts=${3:-128}
if [ -n "$4" ]; then
    attn_implementation=$4
elif "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then
    attn_implementation=flash_attention_2
else
    attn_implementation=sdpa
fi
source_path=${5:-./}
model_path=${6:-$ROOT/ckpt/pyramidkv-tiny-llama}
if [ -z "$6" ] && [ ! -f "$model_path/config.json" ]; then
    echo "error: the embedded checkpoint is missing at $model_path (train it with scripts/train_tiny_model.py) or pass a model path as \$6" >&2
    exit 2
fi
save_dir=${source_path%/}/results_long_bench
results_dir=$save_dir/$(basename "$model_path")_$max_capacity_prompts

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags on purpose
"$PYTHON" "$ROOT/run_longbench.py" \
    --method "$method" \
    --model_path "$model_path" \
    --max_capacity_prompts "$max_capacity_prompts" \
    --attn_implementation "$attn_implementation" \
    --save_dir "$save_dir" \
    --num_threads "${NUM_THREADS:-1}" \
    $EXTRA_ARGS

"$PYTHON" "$ROOT/eval.py" --results_dir "$results_dir"
