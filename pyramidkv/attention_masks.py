"""The per-slot terms the attention hook puts into a layer's mask (pyramidkv.patch applies them):
a batch row's filler slots hidden, and merged slots' additive logit bias (CompressedLayer.slot_bias).

Both act per slot: slot j of a layer is mask column j once the shared mask is right-sliced to the
layer's own length. Hiding works in every mask format the attention functions take; the bias needs an
additive float mask, so it turns the mask into one (eager and sdpa).
"""

import torch


def _hide_filler_slots(mask, fillers, query, key, kind: str):
    """The attention mask with a batch's filler slots hidden from every query.

    fillers [B, K]: True = the layer's slot j (mask column j after the right-slice) holds no token of
    that row. Masks come as bool [B|1, 1, q, kv] (sdpa), additive float (eager), 2-D [B, kv] (flash
    attention's keep-mask) or None (nothing to mask: built here, causal for the last q positions)."""
    batch, slots = fillers.shape
    q_len, kv_len = query.shape[-2], key.shape[-2]
    hidden = fillers.new_zeros(batch, kv_len)
    hidden[:, :slots] = fillers
    if kind == "flash":
        return ~hidden if mask is None else mask.bool() & ~hidden
    if mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=key.device)[:, None]
        mask = (torch.arange(kv_len, device=key.device)[None, :] <= q_pos)[None, None]
        if kind == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=key.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
    hidden = hidden[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return torch.where(hidden, torch.finfo(mask.dtype).min, mask)


def _add_slot_bias(mask, bias, query, key):
    """The attention mask as an additive float mask [B, Hq, q, kv] with the layer's per-slot logit bias
    added (bias [B, stored heads, slots]; slot j = mask column j after the right-slice, decode columns
    beyond the bias get 0). Heads: query head h*groups + g reads stored head h (repeat_kv's order, which
    sdpa's single-query GQA packing keeps)."""
    batch, heads, slots = bias.shape
    q_len, kv_len = query.shape[-2], key.shape[-2]
    dtype = query.dtype
    if mask is None:  # nothing given: the causal mask for the last q positions
        q_pos = torch.arange(kv_len - q_len, kv_len, device=key.device)[:, None]
        mask = (torch.arange(kv_len, device=key.device)[None, :] <= q_pos)[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=key.device).masked_fill(~mask, torch.finfo(dtype).min)
    groups = query.shape[1] // heads
    per_slot = torch.zeros(batch, heads, kv_len, dtype=dtype, device=key.device)
    per_slot[..., :slots] = bias[..., :kv_len].to(dtype)
    per_slot = per_slot.repeat_interleave(groups, dim=1)[:, :, None, :]
    # masked columns stay at the dtype's minimum (a positive bias must not unmask them)
    return torch.where(mask <= torch.finfo(mask.dtype).min, mask, mask + per_slot)
