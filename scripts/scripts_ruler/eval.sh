#!/bin/sh
# RULER prediction + scoring (PyramidKV-style positional arguments, all optional).
#   sh scripts/scripts_ruler/eval.sh [CUDA_DEVICES] [METHOD] [CAPACITY] [ATTN] [SAVE_ROOT] [MODEL]
#   $1 CUDA_VISIBLE_DEVICES (default 0)        $2 method (default PyramidKV): FullKV SnapKV PyramidKV
#   $3 max_capacity_prompts (default 128)         H2O StreamingLLM L2Norm ChunkKV ...
#   $4 attn_implementation (default flash_attention_2 if flash-attn is importable, else sdpa)
#   $5 save root (default ./; results go to $5/results_ruler/{model name}_{capacity})
#   $6 model (default smollm2 = SmolLM2-135M-Instruct, the runners' default; tiny = the embedded
#      ckpt/pyramidkv-tiny-llama; or a checkpoint dir, a .gguf file, an org/name hub id)
# Environment overrides: CONTEXT_LENGTHS (comma list), NUM_SAMPLES, TASKS (comma list), EXTRA_ARGS,
# NUM_THREADS (torch CPU threads; default 1 for tiny, where one thread decodes fastest, torch's own
# default otherwise).
# KIVI quantization (pyramidkv/quant.py), composable with every method: QUANT_METHOD=kivi (default
# none), NBITS (2, 4 or 8; default 4), GROUP_SIZE (default 32), RESIDUAL_LENGTH (default 32) become
# --quant_method/--nbits/--group_size/--residual_length; the results directory then ends in the
# quantization ({model name}_{capacity}_kivi4, plus _g64 / _r16 for a non-default group / residual), as
# the runner names it. The script scores the directory the runner reports (--print_results_dir), so
# flags in EXTRA_ARGS that name it (CommonKV's --factorization whitened, --evict_method) are scored too.
# Defaults per model:
#   smollm2 (and any other model): RULER's shortest official length 4096 tokens, RULER's 11 offline
#     tasks, 10 samples each (110 prompts). On a shared 2-core CPU one prompt took 40 s (niah) to
#     100 s (cwe, whose answer is longest), so expect about 1-1.5 hours; minutes on a GPU. A quick
#     look: TASKS=niah_single_1 NUM_SAMPLES=5 (~3-4 min). Larger runs: scripts/scripts_ruler/sweep.sh.
#   tiny (trained on ~1k-token needle tasks): 1024 tokens, 20 samples per task, 1-2 minutes on 2 cores.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
. "$ROOT/scripts/lib.sh"  # default_attn; quant_flags from the QUANT_* variables

export CUDA_VISIBLE_DEVICES=${1:-0}
method=${2:-PyramidKV}
max_capacity_prompts=${3:-128}
attn_implementation=${4:-$(default_attn)}
source_path=${5:-./}
model_path=${6:-smollm2}
if [ "$model_path" = "tiny" ]; then
    context_lengths=${CONTEXT_LENGTHS:-1024}
    num_samples=${NUM_SAMPLES:-20}
    num_threads=${NUM_THREADS:-1}
else
    context_lengths=${CONTEXT_LENGTHS:-4096}
    num_samples=${NUM_SAMPLES:-10}
    num_threads=${NUM_THREADS:-}
fi
threads_flag=""
[ -n "$num_threads" ] && threads_flag="--num_threads $num_threads"
tasks=${TASKS:-niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe}
save_dir=${source_path%/}/results_ruler
run_runner() {
    # shellcheck disable=SC2086  # threads_flag, quant_flags and EXTRA_ARGS are lists of flags on purpose
    "$PYTHON" "$ROOT/run_ruler.py" \
        --method "$method" \
        --model_path "$model_path" \
        --max_capacity_prompts "$max_capacity_prompts" \
        --attn_implementation "$attn_implementation" \
        --save_dir "$save_dir" \
        --context_lengths "$context_lengths" \
        --num_samples "$num_samples" \
        --tasks "$tasks" \
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
