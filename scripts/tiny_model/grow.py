"""Give a trained checkpoint more KV heads without changing what it computes (function-preserving growth).

With grouped-query attention, query head h reads KV head h // (n_heads / n_kv). Repeating every KV head's
k/v projection rows `factor` times (new head j = old head j // factor) keeps each query head reading the
same keys and values, so the grown model's outputs are those of the old one; training then lets the
copies diverge. Why: a layer-1 head matches the asked key against every needle's key through one KV
head's 32-dim keys, and the 2-KV-head model's copy errors are mostly such mismatches (MODEL_CARD.md).
Background: Chen et al. 2016, "Net2Net: Accelerating Learning via Knowledge Transfer".
"""
from __future__ import annotations

import torch


def _repeat_heads(t: torch.Tensor, old_kv: int, factor: int) -> torch.Tensor:
    return t.reshape(old_kv, -1, *t.shape[1:]).repeat_interleave(factor, dim=0).reshape(-1, *t.shape[1:])


def grow_kv_heads(model_state: dict, opt_state: dict, model) -> bool:
    """Widen k_proj/v_proj (and their AdamW moments) of a saved state to `model`'s KV-head count, in place.

    Returns whether anything was grown. Raises ValueError if the target count is not a multiple of the old.
    """
    new_kv, head_dim = model.config.num_key_value_heads, model.config.head_dim
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's param order
    grown = False
    for name, param in model.named_parameters():
        if not name.endswith(("k_proj.weight", "v_proj.weight")) or model_state[name].shape == param.shape:
            continue
        old_kv = model_state[name].shape[0] // head_dim
        if new_kv % old_kv:
            raise ValueError(f"--kv_heads {new_kv}: must be a multiple of the checkpoint's {old_kv} KV heads")
        factor = new_kv // old_kv
        model_state[name] = _repeat_heads(model_state[name], old_kv, factor)
        moments = opt_state["state"].get(names.index(name), {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                moments[key] = _repeat_heads(moments[key], old_kv, factor)
        grown = True
    return grown
