"""Chunked prefill: the prompt runs through the model `prefill_chunk_size` tokens at a time, and after
each chunk every layer compresses back to its budget, so a layer never holds more than budget + chunk
K/V tokens and attention costs O(prompt * (budget + chunk)) instead of O(prompt^2).

How (no transformers forward is copied): the patched base-model forward (pyramidkv.patch) calls the
original forward once per chunk on the same CompressedCache. Chunk i's keys are appended to the layer's
kept slots (CompressedLayer.update with `compress_after_update`), attention runs over kept + chunk, and
the method's usual rule picks the layer's kept set from them: the chunk's last window_size queries vote
over kept + chunk keys. Kept tokens keep their true RoPE positions, and the cache's mask contract
(get_mask_sizes: kept slot j = mask column j + true length - physical length) holds across chunks, so
the causal/padding mask transformers builds for chunk i covers the kept slots.

Choices:
- the grid is aligned to the prompt's END: the first chunk holds the remainder (S mod chunk tokens),
  every later chunk exactly `prefill_chunk_size`. A left-padded row then sees the chunk boundaries of
  its own single run, so padded rows equal single runs.
- budgets (PyramidKV's per-layer schedule, ratio budgets) come from each row's FULL real length, as in
  the unchunked run: the final kept set has the unchunked sizes, and budget >= prompt keeps everything,
  i.e. equals the unchunked run exactly.
- the forward returns the last chunk's output with `last_hidden_state` of ALL chunks concatenated, so
  `model(input_ids)` still gets every position's logits (generate only reads the last one); the
  hidden states cost B * S * hidden_size, far below the full K/V. output_hidden_states /
  output_attentions are refused.
- methods: those whose rule reads only the window's queries and the keys (CHUNKABLE). Merging methods
  (slot bias), accumulated-attention ones that need every prompt query (H2O, PyramidInfer), self-sized
  and per-head methods, decode-time compression, pos_shift and quantized storage are refused.
"""

from __future__ import annotations

import torch

CHUNKABLE = ("FullKV", "SnapKV", "PyramidKV", "ChunkKV", "TOVA", "StreamingLLM", "L2Norm")


def check_method(method) -> None:
    """One-line ValueError for a method / setting that cannot prefill in chunks."""
    chunk = method.prefill_chunk_size
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"prefill_chunk_size={chunk!r} is invalid: it must be a positive integer (or None = off)")
    if method.name not in CHUNKABLE:
        raise ValueError(f"prefill_chunk_size cannot be used with {method.name}; valid methods: {', '.join(CHUNKABLE)}")
    blockers = {"max_cache_size / compress_interval (compression while decoding)": method.decodes,
                "pos_shift": method.pos_shift, f"quant_method={method.quant_method!r}": method.quant_method != "none"}
    for what, blocked in blockers.items():
        if blocked:
            raise ValueError(f"prefill_chunk_size is not supported with {what}; use it without")
    if chunk < method.window_size:
        raise ValueError(f"prefill_chunk_size={chunk} must be at least window_size={method.window_size} "
                         f"(the chunk's last window_size queries vote)")


def should_chunk(cache, tokens: int) -> bool:
    chunk = getattr(cache.method, "prefill_chunk_size", None)
    return chunk is not None and tokens > chunk and cache.get_seq_length() == 0


def chunk_bounds(length: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk, aligned to the end (the first chunk holds the remainder)."""
    first = length % chunk or chunk
    return [(0, first)] + [(start, start + chunk) for start in range(first, length, chunk)]


def run_chunked(original_forward, model, cache, parameters, args, kwargs):
    """The base model's forward over the prompt in chunks, on `cache` (already active)."""
    from .cache import CompressedLayer

    named = {**dict(zip(parameters, args)), **kwargs}
    if any(type(layer) is not CompressedLayer for layer in cache.layers):
        raise ValueError(f"prefill_chunk_size is not supported with {type(cache.layers[0]).__name__} storage; "
                         f"valid: the dense cache (quant_method='none', a method from {', '.join(CHUNKABLE)})")
    for flag in ("output_hidden_states", "output_attentions"):
        if named.get(flag):
            raise ValueError(f"{flag}=True is not supported with prefill_chunk_size (only the last chunk's "
                             f"would exist); run without one of them")
    tokens = named.get("input_ids")
    tokens = tokens if tokens is not None else named["inputs_embeds"]
    mask = named.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"prefill_chunk_size needs a 2-D attention_mask (or none), got {mask.dim()}-D")
    length, batch = tokens.shape[1], tokens.shape[0]
    real = [length] * batch if mask is None else [int(n) for n in mask.sum(-1).tolist()]
    cache.prefill_real_lengths = real  # budgets from each row's full real length
    hidden, output = [], None
    try:
        for index, (start, end) in enumerate(chunk_bounds(length, cache.method.prefill_chunk_size)):
            piece = dict(named)
            for name in ("input_ids", "inputs_embeds"):
                if named.get(name) is not None:
                    piece[name] = named[name][:, start:end]
            if named.get("position_ids") is not None:
                piece["position_ids"] = named["position_ids"][..., start:end]
            if mask is not None:
                piece["attention_mask"] = mask[:, :end]
            for layer in cache.layers:
                # the kept slots hidden from the chunk's vote: a row's fillers and pads (by the mask contract)
                layer.kept_hidden = cache._hidden_slots(layer) if index else None
                layer.compress_after_update = index > 0
            cache.padding_mask = None if mask is None else mask[:, :end]
            cache.prefill_seen = [end] * batch if mask is None else [int(n) for n in mask[:, :end].sum(-1).tolist()]
            output = original_forward(model, **piece)
            hidden.append(output.last_hidden_state)
    finally:
        cache.prefill_real_lengths = cache.prefill_seen = None
        for layer in cache.layers:
            layer.kept_hidden, layer.compress_after_update = None, False
    output.last_hidden_state = torch.cat(hidden, dim=1)
    return output


def chunk_padding(cache, layer, seq_len: int) -> torch.Tensor | None:
    """[B, kept + chunk] True = real token, for a chunk's compression (None = all real): the kept slots'
    hidden flags recorded before the chunk, then the chunk's own padding columns."""
    kept_hidden, mask = layer.kept_hidden, cache.padding_mask
    chunk = seq_len - (0 if kept_hidden is None else kept_hidden.shape[-1])
    device = layer.keys.device
    if mask is None:
        batch = layer.keys.shape[0]
        chunk_real = torch.ones(batch, chunk, dtype=torch.bool, device=device)
    else:
        chunk_real = mask[:, -chunk:].to(device).bool()
    real = chunk_real if kept_hidden is None else torch.cat([~kept_hidden.to(device), chunk_real], dim=-1)
    return None if bool(real.all()) else real
