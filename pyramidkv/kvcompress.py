"""CS3602's kvcompress function API over pyramidkv, and `compress_cache` for a finished cache.

    from pyramidkv.kvcompress import l2_compress, streaming_llm_compress, get_compress_fn, list_methods
    compressed = l2_compress(past_key_values, keep_ratio=0.8, prune_after=1000, skip_layers=[0, 1])
    compressed = get_compress_fn("streaming_llm")(past_key_values, start_size=4, recent_size=508)

Each function compresses every layer of `past_key_values` (a transformers DynamicCache, a pyramidkv
CompressedCache holding a whole prompt, or a list of (key, value) tensors [B, heads, S, head_dim]) with
the method of that name (pyramidkv/methods/cs3602.py) and returns a pyramidkv.CompressedCache: it keeps
each token's true position, so decode with it inside `pyramidkv.compress(model, "fullkv")` (or any
pyramidkv patch), whose attention hook sizes the mask per layer. Unknown parameters are an error (the
original ignores them). `evaluate_with_compression(model, tokenizer, text, compress_fn=...,
compress_kwargs=...)` is CS3602's evaluation: teacher-forced perplexity and next-token accuracy over the
text with the function's method applied to the cache after every token (pyramidkv/ppl.py).
"""

from __future__ import annotations

import torch

from .cache import CompressedCache
from .methods import build_method

# CS3602 registry name -> its function name
FUNCTION_NAMES = {
    "l2_compress": "l2_compress",
    "fix_size_l2": "fix_size_l2_compress",
    "streaming_llm": "streaming_llm_compress",
    "h2o_l2": "h2o_l2_compress",
    "snapkv_lite": "snapkv_lite_compress",
    "pyramid_kv": "pyramid_kv_compress",
    "adaptive_l2": "adaptive_l2_compress",
    "recent_only": "recent_only_compress",
}


def _layers_of(past_key_values) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(past_key_values, (list, tuple)):
        layers = [tuple(layer) for layer in past_key_values]
    elif hasattr(past_key_values, "layers"):
        layers = [(layer.keys, layer.values) for layer in past_key_values.layers]
    else:
        raise ValueError(f"past_key_values of type {type(past_key_values).__name__} is not a cache; valid: a "
                         f"DynamicCache, a CompressedCache or a list of (key, value) tensors")
    if not layers or any(k is None or v is None or k.dim() != 4 for k, v in layers):
        raise ValueError("past_key_values holds no keys/values of shape [batch, heads, tokens, head_dim] "
                         "(run the model on a prompt first)")
    if isinstance(past_key_values, CompressedCache) and any(
            layer.get_seq_length() != layer.physical_length for layer in past_key_values.layers):
        raise ValueError("past_key_values is already compressed; compress_cache takes a cache holding every token")
    return layers


def compress_cache(past_key_values, method: str, **config) -> CompressedCache:
    """Compress a finished cache after the fact with a key-only method (CS3602's eight, L2Norm,
    StreamingLLM, FullKV); a method that scores with the prompt's queries raises a one-line error."""
    built = build_method(method, **config)
    if built.needs_queries:
        raise ValueError(f"{built.name} scores tokens with the prompt's queries, which a finished cache does not "
                         f"hold; compress_cache takes key-only methods ({', '.join(FUNCTION_NAMES)}, L2Norm, "
                         f"StreamingLLM), or run the model inside pyramidkv.compress(model, {method!r})")
    layers = _layers_of(past_key_values)
    cache = CompressedCache(built, len(layers))
    for index, (keys, values) in enumerate(layers):
        # key-only methods read no query: a placeholder with one query per KV head (GQA groups of 1)
        query = keys.new_zeros(keys.shape[0], keys.shape[1], 1, keys.shape[-1])
        cache.layers[index].update(keys, values)
        cache.compress_layer(index, query, keys, values, keys.shape[-1] ** -0.5)
    return cache


def _function(name: str):
    def compress_fn(past_key_values, **config) -> CompressedCache:
        return compress_cache(past_key_values, name, **config)

    compress_fn.__name__ = compress_fn.__qualname__ = FUNCTION_NAMES[name]
    compress_fn.__doc__ = f"CS3602's {FUNCTION_NAMES[name]}: compress_cache(past_key_values, {name!r}, **config)."
    return compress_fn


l2_compress = _function("l2_compress")
fix_size_l2_compress = _function("fix_size_l2")
streaming_llm_compress = _function("streaming_llm")
h2o_l2_compress = _function("h2o_l2")
snapkv_lite_compress = _function("snapkv_lite")
pyramid_kv_compress = _function("pyramid_kv")
adaptive_l2_compress = _function("adaptive_l2")
recent_only_compress = _function("recent_only")
COMPRESS_METHODS = {name: globals()[function] for name, function in FUNCTION_NAMES.items()}


def list_methods() -> list[str]:
    """CS3602's eight registry names."""
    return list(COMPRESS_METHODS)


def get_compress_fn(name: str):
    """The compression function of a CS3602 registry name; unknown names: a one-line ValueError."""
    if name not in COMPRESS_METHODS:
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(COMPRESS_METHODS)}")
    return COMPRESS_METHODS[name]


def evaluate_with_compression(model, tokenizer, text: str, compress_fn=None, compress_kwargs: dict | None = None,
                              num_eval_tokens: int | None = None, progress: bool = False) -> dict:
    """CS3602's evaluation: the text fed one token at a time, the cache compressed by `compress_fn`'s method
    (one of this module's functions, or a registry name; None = the full cache) after every token;
    returns perplexity, accuracy, ttft_s, tpot_s, throughput_tok_s, kv_cache_tokens, kv_cache_bytes.
    `num_eval_tokens`: predictions (None: the whole text, at most 2000, CS3602's count)."""
    from . import ppl

    method = None
    if compress_fn is not None:
        name = compress_fn if isinstance(compress_fn, str) else getattr(compress_fn, "__name__", None)
        by_function = {function: registry for registry, function in FUNCTION_NAMES.items()}
        method = by_function.get(name, name if name in FUNCTION_NAMES else None)
        if method is None:
            raise ValueError(f"compress_fn={compress_fn!r} is not a pyramidkv.kvcompress function; valid choices: "
                             f"{', '.join(FUNCTION_NAMES.values())} (or their registry names)")
    config = {**(compress_kwargs or {}), "compress_interval": (compress_kwargs or {}).get("compress_interval", 1)}
    if method is not None:
        build_method(method, **config)  # bad settings: a one-line error before any forward
    if num_eval_tokens is None:
        available = len(tokenizer(text, add_special_tokens=True)["input_ids"]) - 1 if text else 0
        num_eval_tokens = max(1, min(2000, available))
    ids = ppl.token_ids_for(tokenizer, text, num_eval_tokens)
    return ppl.evaluate_ids(model, ids, method, config if method else None, progress=progress)


__all__ = [*FUNCTION_NAMES.values(), "COMPRESS_METHODS", "compress_cache", "evaluate_with_compression",
           "get_compress_fn", "list_methods"]
