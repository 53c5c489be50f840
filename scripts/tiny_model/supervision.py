"""Attention supervision: capture post-RoPE q/k of chosen layers and score one head's attention rows.

Registered as its own attention implementation ("sdpa_supervised") that stores (query, key) for the
layers we supervise and then runs the stock SDPA kernel, so the forward pass is unchanged.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_supervised"
CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _attention(module, query, key, value, attention_mask, **kwargs):
    if module.training:
        CAPTURED[module.layer_idx] = (query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install(model) -> None:
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # without it the mask would not be causal
    model.set_attn_implementation(NAME)


def head_loss(layer: int, head: int, rows: list[tuple[int, int, list[int]]], scaling: float) -> torch.Tensor:
    """-log(attention mass on the target positions), averaged over rows (batch, query_pos, targets)."""
    q_all, k_all = CAPTURED[layer]
    group = q_all.shape[1] // k_all.shape[1]
    b = torch.tensor([r[0] for r in rows], device=q_all.device)
    p = torch.tensor([r[1] for r in rows], device=q_all.device)
    # one (B, L, L) score matrix for the head, then the supervised rows: cheaper than per-row key copies
    scores = torch.matmul(q_all[:, head], k_all[:, head // group].transpose(-1, -2))
    logits = scores[b, p].float() * scaling                 # (N, L)
    L = logits.shape[1]
    cols = torch.arange(L, device=q_all.device)
    logits = logits.masked_fill(cols[None, :] > p[:, None], float("-inf"))
    target = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):  # filled on the CPU: per-row writes to a GPU tensor are one launch each
        target[i, r[2]] = True
    target = target.to(q_all.device)
    on_target = logits.masked_fill(~target, float("-inf")).logsumexp(-1)
    return (logits.logsumexp(-1) - on_target).mean()
