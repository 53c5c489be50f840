"""`pos_shift=True`: positions by cache slot (StreamingLLM's and CaM's `--enable_pos_shift`).

By default pyramidkv keeps every token at its TRUE position (the cache contract in cache.py). With
pos_shift the tokens a layer holds sit at positions 0, 1, 2, ... in slot order, and a new token at the
next one, so generation can run past the model's trained length (StreamingLLM, Xiao et al. 2024,
§3.2: "positions within the cache"). Keys are stored post-RoPE, so a key that changes position is
re-rotated by the difference (RoPE rotations compose: R(a) R(b) = R(a + b)):

- after prefill compression, kept slot j of row b goes from its prompt position to j - fillers_b;
- after a decode eviction, kept slot j goes from its old rank to its new rank;
- a decode forward gets position_ids = layer 0's next rank per row (set by the patched forward); a
  layer that holds another number of tokens (per-layer budgets) rotates the step's queries and new
  keys by its own difference before attention, so in every layer the query sits right after its keys.

Prefill attention itself runs at the prompt's positions (the whole prompt is in range). Needs RoPE with
the rotate-half layout (Llama, Mistral, Qwen2/3) and a method that reports its kept positions (the
eviction methods and CaM; not SimCalKV/KeepKV/PyramidInfer, whose merged keys have no one position).
"""

from __future__ import annotations

import torch


def check_method(method) -> None:
    """One-line error for a method whose slots have no single position to renumber."""
    from .methods.base import KVMethod
    from .methods.cam import CaM

    if getattr(method, "quant_method", "none") != "none" or type(method).new_layer is not KVMethod.new_layer:
        raise ValueError(f"pos_shift=True re-rotates dense stored keys; {method.name} with its storage "
                         f"(quant_method={getattr(method, 'quant_method', 'none')!r}) is not supported; "
                         f"valid: quant_method='none' and a dense-storage method")
    if type(method).compress is not KVMethod.compress and not isinstance(method, CaM):
        raise ValueError(f"pos_shift=True needs each kept slot's prompt position, which {method.name} "
                         f"(merged keys) does not have; valid with eviction methods and CaM")


def rotate_half(states: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate-half layout (Llama, Mistral, Qwen): [x1, x2] -> [-x2, x1]."""
    half = states.shape[-1] // 2
    return torch.cat([-states[..., half:], states[..., :half]], dim=-1)


def rotate(states: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Post-RoPE states [B, H, N, D] moved by `delta` positions ([B, H, N] or broadcastable)."""
    angle = delta.to(torch.float32)[..., None] * inv_freq.to(states.device, torch.float32)  # [.., D/2]
    cos, sin = torch.cat([angle.cos()] * 2, dim=-1), torch.cat([angle.sin()] * 2, dim=-1)
    return (states.float() * cos + rotate_half(states).float() * sin).to(states.dtype)


def _inv_freq(model) -> torch.Tensor:
    rotary = getattr(model, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise ValueError(f"pos_shift=True needs a rotary embedding (model.rotary_emb.inv_freq); "
                         f"{type(model).__name__} has none")
    return inv_freq


def set_positions(model, cache, query_len: int, position_ids: torch.Tensor | None, device) -> torch.Tensor:
    """The position_ids this forward runs with: the given ones (or the cache's default) at prefill,
    layer 0's next slot rank per row while decoding. Recorded on the cache for the hooks below."""
    cache.pos_shift_inv_freq = _inv_freq(model)
    if cache.get_seq_length() == 0:
        if position_ids is None:
            position_ids = torch.arange(query_len, device=device)[None]
    else:
        layer = cache.layers[0]
        held = layer.physical_length - cache._hidden_slots(layer).sum(-1)  # [B] tokens row b holds
        position_ids = held.to(device)[:, None] + torch.arange(query_len, device=device)[None]
    cache.pos_shift_positions = position_ids
    return position_ids


def renumber_after_prefill(cache, layer, keep: torch.Tensor | None, kept_per_row: list[int]) -> None:
    """Kept slot j of row b: from its prompt position to rank j - fillers_b (fillers are hidden)."""
    keys = layer.keys
    batch, heads, slots, _ = keys.shape
    positions = cache.pos_shift_positions.to(keys.device).expand(batch, -1)  # [B, S] prompt positions
    prompt_len = positions.shape[-1]
    if keep is None:  # every row kept whole: slot j holds prompt token S - slots + j
        keep = torch.arange(prompt_len - slots, prompt_len, device=keys.device).expand(batch, heads, slots)
    old = positions[:, None, :].expand(batch, heads, prompt_len).gather(-1, keep)
    fillers = torch.tensor([slots - kept for kept in kept_per_row], device=keys.device)
    new = (torch.arange(slots, device=keys.device)[None, :] - fillers[:, None]).clamp(min=0)[:, None, :]
    _rotate_keys(layer, new - old, cache.pos_shift_inv_freq)


def renumber_after_eviction(cache, layer, keep: torch.Tensor, hidden_before: torch.Tensor, fillers: list[int]) -> None:
    """Kept slot j (old slot keep[.., j]): from rank keep - hidden_before_b to rank j - fillers_b."""
    device = layer.keys.device
    old = keep - hidden_before.sum(-1).to(device)[:, None, None]
    new = torch.arange(keep.shape[-1], device=device)[None, :] - torch.tensor(fillers, device=device)[:, None]
    _rotate_keys(layer, new[:, None, :] - old, cache.pos_shift_inv_freq)


def shift_new_tokens(cache, layer, query: torch.Tensor) -> torch.Tensor:
    """Before a decode step's attention: rotate this layer's new keys (in place) and the queries from
    the forward's positions to the layer's own next ranks; layer 0 (and any equal layer) moves by 0."""
    q_len = query.shape[-2]
    held = layer.physical_length - cache._hidden_slots(layer).sum(-1)  # [B], the step's tokens included
    ranks = held.to(query.device)[:, None] - q_len + torch.arange(q_len, device=query.device)[None]
    delta = ranks - cache.pos_shift_positions.to(query.device)  # [B, q]
    if not bool(delta.any()):
        return query
    inv_freq = cache.pos_shift_inv_freq
    new_keys = layer.keys[:, :, -q_len:]
    new_keys.copy_(rotate(new_keys, delta[:, None, :], inv_freq))  # layer.keys is the buffer's view
    return rotate(query, delta[:, None, :], inv_freq)


def _rotate_keys(layer, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    if bool(delta.any()):
        layer.keys.copy_(rotate(layer.keys, delta.expand(*layer.keys.shape[:3]), inv_freq))
