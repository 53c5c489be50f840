"""Greedy generation of one prompt with prefill and decode timed separately, and the K/V bytes held after.

A plain loop over the model's forward instead of `generate`, so the clock stops right after the first
token (prefill, including the compression done inside it = time to first token) and again after the
last one (decode). The per-step `.item()` (needed to test for EOS) synchronises a GPU, so the times are
wall-clock times of finished work.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass


@dataclass
class TimedGeneration:
    token_ids: list[int]  # generated tokens (an EOS that ended generation included)
    prefill_s: float  # prompt forward incl. compression, up to the first token
    decode_s: float  # the remaining tokens
    kv_bytes: int  # bytes of the K/V the cache stores after generation (kept + generated tokens)
    kv_allocated_bytes: int  # bytes allocated for them (a CompressedCache's decode buffer has spare room)
    kept_tokens: list | None  # per layer, tokens kept after prefill (compressed caches only)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values a cache stores, summed over its layers: the same count for
    transformers' DynamicCache and for a CompressedCache (whose layers' keys/values are the stored
    tokens, without the spare room of the decode buffer; that is `kv_allocated_bytes`)."""
    held = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and hasattr(tensor, "numel"):
                held += tensor.numel() * tensor.element_size()
    return held


def kv_allocated_bytes(cache) -> int:
    """Bytes allocated for the K/V: `CompressedCache.nbytes()` (decode buffer capacity included); a
    DynamicCache concatenates into exactly-sized tensors, so there it equals `kv_cache_bytes`."""
    return int(cache.nbytes()) if hasattr(cache, "nbytes") else kv_cache_bytes(cache)


def eos_token_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set() if configured is None else ({configured} if isinstance(configured, int) else set(configured))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_greedy(model, input_ids: list[int], max_new_tokens: int, eos_ids: set[int],
                 method: str | None = None, method_config: dict | None = None) -> TimedGeneration:
    """Greedy decoding of one prompt; under `pyramidkv.compress(model, method, **method_config)` when a
    method is given, else with transformers' default cache (DynamicCache, the full cache)."""
    import torch

    import pyramidkv

    scope = pyramidkv.compress(model, method, **(method_config or {})) if method else contextlib.nullcontext()
    device = model.device
    prompt = torch.tensor([input_ids], device=device)
    generated: list[int] = []
    with torch.inference_mode(), scope:
        _synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        generated.append(int(out.logits[0, -1].argmax()))
        prefill_end = time.perf_counter()
        cache = out.past_key_values
        while len(generated) < max_new_tokens and generated[-1] not in eos_ids:
            step = torch.tensor([[generated[-1]]], device=device)
            out = model(input_ids=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            generated.append(int(out.logits[0, -1].argmax()))
        _synchronize(device)
        end = time.perf_counter()
    kept = cache.kept_tokens() if hasattr(cache, "kept_tokens") else None
    return TimedGeneration(generated, prefill_end - start, end - prefill_end, kv_cache_bytes(cache),
                           kv_allocated_bytes(cache), kept)
