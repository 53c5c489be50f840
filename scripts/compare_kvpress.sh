#!/usr/bin/env bash
# Side-by-side efficiency of pyramidkv and NVIDIA kvpress on the same tiny Llama, prompt and kept tokens.
# Not part of CI. kvpress 0.5.5 needs transformers < 5.3, so it runs in its own virtualenv (created on
# first use; kvpress is installed from PyPI, never vendored); pyramidkv runs in the current python.
#
# usage: scripts/compare_kvpress.sh [--help]
# settings (environment variables, defaults in brackets):
#   CONTEXTS [4096,16384]  BUDGET [256] kept tokens per layer and KV head (kvpress: compression_ratio
#   = 1 - (BUDGET + 0.5) / context)  NEW_TOKENS [64]  REPEATS [3]  WARMUP [1]  THREADS [2]
#   WINDOW [64] KERNEL [5] (SnapKV, kvpress's defaults on both sides)
#   KVPRESS_VENV [~/.cache/pyramidkv/kvpress-venv]  KVPRESS_VERSION [0.5.5]
#   OUT [bench_out/kvpress_comparison_<UTC time>] -> OUT.json, OUT.md (the committed
#   benchmarks/kvpress_comparison is written only when OUT names it)   NOTE [""] stored with the results
#   PYTHON [python3] the interpreter that has pyramidkv's requirements
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=${KVPRESS_VENV:-$HOME/.cache/pyramidkv/kvpress-venv}
KVPRESS_VERSION=${KVPRESS_VERSION:-0.5.5}
CONTEXTS=${CONTEXTS:-4096,16384}
BUDGET=${BUDGET:-256}
NEW_TOKENS=${NEW_TOKENS:-64}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-2}
WINDOW=${WINDOW:-64}
KERNEL=${KERNEL:-5}
OUT=${OUT:-$REPO/bench_out/kvpress_comparison_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$(dirname "$OUT")"
NOTE=${NOTE:-}
cd "$REPO"

# 1. kvpress's virtualenv, with the same torch as ours (pip resolves it from the index / wheel cache)
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
if ! "$VENV/bin/python" -c "import kvpress" 2>/dev/null; then
  echo "== creating $VENV (torch==$TORCH_VERSION, kvpress==$KVPRESS_VERSION)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "kvpress==$KVPRESS_VERSION" psutil tqdm
fi
echo "== kvpress side: $("$VENV/bin/python" -c "import importlib.metadata as m; print(*(p + '==' + m.version(p) for p in ('kvpress', 'transformers', 'torch')))")"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
COMMON=(--context_lengths "$CONTEXTS" --budget "$BUDGET" --new_tokens "$NEW_TOKENS" --repeats "$REPEATS"
        --warmup "$WARMUP" --threads "$THREADS" --window_size "$WINDOW" --kernel_size "$KERNEL")

# 2. one model on disk for both sides (random weights, the benchmark's tiny Llama)
"$PYTHON" scripts/bench/compare_ours.py save-model "$WORK/model"
# 3. pyramidkv, then kvpress, same prompt (seeded), same settings
echo "== pyramidkv"
"$PYTHON" scripts/bench/compare_ours.py run --model_path "$WORK/model" "${COMMON[@]}" --out "$WORK/ours.json"
echo "== kvpress"
"$VENV/bin/python" scripts/bench/kvpress_side.py --model_path "$WORK/model" "${COMMON[@]}" --out "$WORK/kvpress.json"
# 4. the paired table
"$PYTHON" scripts/bench/compare_ours.py report "$WORK/ours.json" "$WORK/kvpress.json" --out_prefix "$OUT" \
  --note "$NOTE" --command "CONTEXTS=$CONTEXTS BUDGET=$BUDGET NEW_TOKENS=$NEW_TOKENS REPEATS=$REPEATS WARMUP=$WARMUP THREADS=$THREADS WINDOW=$WINDOW KERNEL=$KERNEL scripts/compare_kvpress.sh"
