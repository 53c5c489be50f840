# Shared by scripts/scripts_*/eval.sh and sweep.sh (sourced after ROOT and PYTHON are set:
#   . "$ROOT/scripts/lib.sh").

# The attention kernel when none is given: flash_attention_2 if flash-attn imports, else sdpa.
default_attn() {
    if "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then echo flash_attention_2; else echo sdpa; fi
}

# quant_flags: the runner flags for QUANT_METHOD / NBITS / GROUP_SIZE / RESIDUAL_LENGTH (unset = the
# method's defaults); quant_suffix: what the runner appends to the results directory for them
# (_kivi4, plus _g<size> / _r<length> when not the default 32).
quant_flags=""
quant_suffix=""
[ -n "$QUANT_METHOD" ] && quant_flags="--quant_method $QUANT_METHOD"
[ -n "$NBITS" ] && quant_flags="$quant_flags --nbits $NBITS"
[ -n "$GROUP_SIZE" ] && quant_flags="$quant_flags --group_size $GROUP_SIZE"
[ -n "$RESIDUAL_LENGTH" ] && quant_flags="$quant_flags --residual_length $RESIDUAL_LENGTH"
if [ -n "$QUANT_METHOD" ] && [ "$QUANT_METHOD" != "none" ]; then
    quant_suffix="_$QUANT_METHOD${NBITS:-4}"
    [ -n "$GROUP_SIZE" ] && [ "$GROUP_SIZE" != 32 ] && quant_suffix="${quant_suffix}_g$GROUP_SIZE"
    [ -n "$RESIDUAL_LENGTH" ] && [ "$RESIDUAL_LENGTH" != 32 ] && quant_suffix="${quant_suffix}_r$RESIDUAL_LENGTH"
fi
