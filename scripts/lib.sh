# Shared by scripts/scripts_*/eval.sh and sweep.sh (sourced after ROOT and PYTHON are set:
#   . "$ROOT/scripts/lib.sh").

# The attention kernel when none is given: flash_attention_2 if flash-attn imports, else sdpa.
default_attn() {
    if "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then echo flash_attention_2; else echo sdpa; fi
}

# quant_flags: the runner flags for QUANT_METHOD / NBITS / GROUP_SIZE / RESIDUAL_LENGTH (unset = the
# method's defaults). if-blocks, not `[ ... ] && ...`: a false test as the last command would make
# sourcing this file fail, and the calling script (set -e) stop without a word.
quant_flags=""
if [ -n "$QUANT_METHOD" ]; then quant_flags="--quant_method $QUANT_METHOD"; fi
if [ -n "$NBITS" ]; then quant_flags="$quant_flags --nbits $NBITS"; fi
if [ -n "$GROUP_SIZE" ]; then quant_flags="$quant_flags --group_size $GROUP_SIZE"; fi
if [ -n "$RESIDUAL_LENGTH" ]; then quant_flags="$quant_flags --residual_length $RESIDUAL_LENGTH"; fi
