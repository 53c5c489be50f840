"""The checks the patched forward runs before compressing: an attention kernel pyramidkv can run (with
the method's needs), and a cache it can compress into. Each failure is a one-line ValueError."""

from __future__ import annotations

import importlib.util

from transformers.cache_utils import Cache, DynamicCache

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attention_implementation(config, method=None) -> None:
    """One-line error for a kernel pyramidkv cannot run (or cannot run `method` on: a method whose slots
    carry a logit bias needs an additive mask, i.e. eager or sdpa)."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={implementation!r} is not supported by pyramidkv; "
            f"valid choices: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if implementation == "flash_attention_2" and method is not None and method.uses_logit_bias:
        raise ValueError(
            f"attn_implementation='flash_attention_2' cannot add {method.name}'s per-slot logit bias "
            f"(merged slots); valid choices for {method.name}: eager, sdpa"
        )
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package "
            "(pip install -e .[flash] on a CUDA machine); valid choices without it: eager, sdpa"
        )


def check_cache_is_compressible(cache, model) -> None:
    """A cache pyramidkv would leave uncompressed is an error, not a silent full-cache run."""
    if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
        return
    where = f"{type(model).__name__} runs under a pyramidkv patch"
    if type(cache) is DynamicCache:
        raise ValueError(
            f"past_key_values is a DynamicCache already holding {cache.get_seq_length()} uncompressed tokens "
            f"and {where}; pass a fresh cache, or the CompressedCache of a compressed run"
        )
    kind = "a transformers Cache" if isinstance(cache, Cache) else "not a Cache"
    raise ValueError(
        f"past_key_values of type {type(cache).__name__} ({kind}) cannot be compressed and {where}; "
        f"valid: none, an empty DynamicCache or a pyramidkv.CompressedCache (no cache_implementation='static')"
    )
