"""Token-selection helpers shared by the methods: top-k of the prefix plus the window, the observation
window's attention, SnapKV's pooled votes, GQA group means and gathers (split out of base.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .base import PrefillInputs


def gather_tokens(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """states [B, H, S, D], keep [B, H, K] -> [B, H, K, D]."""
    index = keep.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
    return states.gather(2, index)


def keep_top_prefix_and_window(
    prefix_scores: torch.Tensor, row_budgets: int | Sequence[int], seq_len: int, padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Per row: the top (budget - window) prefix tokens per head (in original order), then the window.

    Left padding: pads are never picked. Rows may have different budgets (PyramidKV's schedule follows
    each row's own length); the result is dense [B, H, K] with K the largest row's count, and row b's
    kept tokens fill its LAST kept_b slots. Its first K - kept_b slots hold positions S-K .. S-kept_b-1:
    for a row kept whole (real length <= budget) those are its pads, on columns the attention mask
    already hides; for a compressed row below K they are fillers that CompressedCache hides with a
    per-row slot mask (a padding mask cannot: the row has fewer pad columns than filler slots).
    """
    batch, heads, prefix_len = prefix_scores.shape
    window = seq_len - prefix_len
    device = prefix_scores.device
    budgets = [row_budgets] * batch if isinstance(row_budgets, int) else list(row_budgets)
    lengths = [seq_len] * batch if padding_mask is None else [int(n) for n in padding_mask.sum(-1).tolist()]
    kept = [min(budget, length) for budget, length in zip(budgets, lengths)]
    slots = max(kept)
    window_idx = torch.arange(prefix_len, seq_len, device=device).expand(heads, window)
    rows = []
    for row, (keep, length) in enumerate(zip(kept, lengths)):
        if keep >= length:  # kept whole
            rows.append(torch.arange(seq_len - slots, seq_len, device=device).expand(heads, slots))
            continue
        scores = prefix_scores[row]
        if padding_mask is not None:
            scores = scores.masked_fill(~padding_mask[row, None, :prefix_len].bool(), float("-inf"))
        # stable sort: equal scores (maxpool plateaus) resolve to the lowest position, with or without padding
        order = scores.sort(dim=-1, descending=True, stable=True).indices
        top = order[:, : keep - window].sort(dim=-1).values
        filler = torch.arange(seq_len - slots, seq_len - keep, device=device).expand(heads, slots - keep)
        rows.append(torch.cat([filler, top, window_idx], dim=-1))
    return torch.stack(rows)


def window_attention(x: PrefillInputs, window: int) -> torch.Tensor:
    """Softmax attention [B, Hq, window, S] (fp32) of the last `window` queries over all keys,
    causal inside the window and blind to pads."""
    seq_len = x.seq_len
    batch, kv_heads, _, head_dim = x.keys.shape
    groups = x.num_kv_groups
    # GQA without repeating the keys (a copy of all S keys per query head): query head h*groups + g
    # reads KV head h, so each group's query heads become extra rows of one matmul per KV head
    query = x.query[:, :, -window:, :].float().reshape(batch, kv_heads, groups * window, head_dim)
    logits = torch.matmul(query, x.keys.float().transpose(2, 3)).view(batch, kv_heads * groups, window, seq_len)
    logits.mul_(x.scaling)
    q_pos = torch.arange(seq_len - window, seq_len, device=logits.device)[:, None]
    k_pos = torch.arange(seq_len, device=logits.device)[None, :]
    visible = (k_pos <= q_pos)[None, None]
    if x.padding_mask is not None:
        visible = visible & x.padding_mask[:, None, None, :].bool()
    logits.masked_fill_(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1)


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return states
    b, h, s, d = states.shape
    return states[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def pool_votes(votes: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling over tokens (stride 1, same length), SnapKV's clustering of neighbouring votes."""
    shape = votes.shape
    flat = votes.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if pooling == "maxpool":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad)  # zero padding counts, as in SnapKV
    return pooled[..., : shape[-1]].reshape(shape)


def group_mean(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-query-head scores [B, Hq, N] -> per-KV-head [B, Hkv, N] (GQA: average over the group)."""
    b, hq, n = scores.shape
    return scores.reshape(b, hq // groups, groups, n).mean(dim=2)
