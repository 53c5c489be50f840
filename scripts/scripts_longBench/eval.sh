#!/bin/sh
# LongBench prediction + scoring (PyramidKV-style positional arguments).
#   sh scripts/scripts_longBench/eval.sh CUDA_DEVICES METHOD [CAPACITY] [ATTN] [SAVE_ROOT] [MODEL]
#   $1 CUDA_VISIBLE_DEVICES (e.g. 0)         $2 method: FullKV SnapKV PyramidKV H2O StreamingLLM L2Norm ChunkKV ...
#   $3 max_capacity_prompts (default 128)    $4 attn_implementation (default flash_attention_2 if
#   $5 save root (default ./; results go       flash-attn is importable, else sdpa)
#      to $5/results_long_bench/{model name}_{capacity})
#   $6 model (default smollm2 = SmolLM2-135M-Instruct, the runners' default; tiny = the embedded
#      ckpt/pyramidkv-tiny-llama; or a checkpoint dir, a .gguf file, an org/name hub id)
# Extra run_longbench.py flags can be passed through the environment: EXTRA_ARGS="--datasets qasper".
# NUM_THREADS sets torch's CPU threads (default 1 for tiny, where one thread is fastest; torch's own
# choice otherwise; it does not matter on GPU).
# KIVI quantization (pyramidkv/quant.py), composable with every method: QUANT_METHOD=kivi (default
# none), NBITS (2, 4 or 8; default 4), GROUP_SIZE (default 32), RESIDUAL_LENGTH (default 32) become
# --quant_method/--nbits/--group_size/--residual_length; the results directory then ends in the
# quantization ({model name}_{capacity}_kivi4, plus _g64 / _r16 for a non-default group / residual), as
# the runner names it. The script scores the directory the runner reports (--print_results_dir), so
# flags in EXTRA_ARGS that name it (CommonKV's --factorization whitened, --evict_method) are scored too.
# Without data/LongBench it runs on the bundled smoke sample data/longbench_smoke (NOT LongBench) and
# its 16 English sets (29 samples; pass EXTRA_ARGS="--datasets all" for all 21): under a minute with
# tiny; with smollm2 a QA sample (~600 prompt tokens) took ~35 s on a loaded, shared 2-core CPU and the
# three summary sets generate up to 512 tokens, so expect roughly 20-40 minutes on CPU.
# Several methods and budgets in one run (one prefill per prompt): scripts/scripts_longBench/sweep.sh.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
. "$ROOT/scripts/lib.sh"  # default_attn; quant_flags from the QUANT_* variables

if [ -z "$2" ]; then
    echo "usage: sh scripts/scripts_longBench/eval.sh CUDA_DEVICES METHOD [CAPACITY] [ATTN] [SAVE_ROOT] [MODEL]" >&2
    exit 2
fi
export CUDA_VISIBLE_DEVICES=$1
method=$2
max_capacity_prompts=${3:-128}
attn_implementation=${4:-$(default_attn)}
source_path=${5:-./}
model_path=${6:-smollm2}
if [ "$model_path" = "tiny" ]; then
    num_threads=${NUM_THREADS:-1}
else
    num_threads=${NUM_THREADS:-}
fi
threads_flag=""
[ -n "$num_threads" ] && threads_flag="--num_threads $num_threads"
save_dir=${source_path%/}/results_long_bench
run_runner() {
    # shellcheck disable=SC2086  # threads_flag, quant_flags and EXTRA_ARGS are lists of flags on purpose
    "$PYTHON" "$ROOT/run_longbench.py" \
        --method "$method" \
        --model_path "$model_path" \
        --max_capacity_prompts "$max_capacity_prompts" \
        --attn_implementation "$attn_implementation" \
        --save_dir "$save_dir" \
        $threads_flag $quant_flags $EXTRA_ARGS "$@"
}
# the directories the runner writes (CommonKV's _whitened / _evictSnapKV, quantization, ratios name them;
# a comma list of methods shares one); bad flags or a model that resolves to nothing stop here with the
# runner's one-line error
results_dirs=$(run_runner --print_results_dir) || exit 2

run_runner

echo "$results_dirs" | sort -u | while IFS= read -r results_dir; do
    "$PYTHON" "$ROOT/eval.py" --results_dir "$results_dir"
done
