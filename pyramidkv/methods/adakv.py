"""AdaKV — Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference" (arXiv:2407.11550).

SnapKV's scores (window votes, pooled, averaged over each GQA group) of all KV heads of a layer are
pooled, and the layer keeps its top (C - w) x heads prefix tokens across heads (the same layer total as
SnapKV), so a head whose attention is concentrated gives tokens to a head whose attention is spread.
Safeguard: every head first keeps its own top floor(alpha x (C - w)) tokens (alpha = `floor_fraction`,
the paper's 0.2). The window is always kept by every head.

"Ada-PyramidKV" (KVCache-Factory's name) is the same rule inside PyramidKV's per-layer budgets.

Storage: pyramidkv/perhead.py — each KV head holds only its own tokens (kvpress's AdaKVPress only
masks, which saves nothing). Decode-time eviction, quantization, pos_shift and chunked prefill are not
supported yet (one-line errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import PrefillInputs, _row_budgets, check_finite_number, gather_tokens
from .pyramidkv import PyramidKV
from .snapkv import SnapKV


def check_per_head_method(method) -> None:
    """One-line errors for options the per-head storage cannot take yet (pos_shift and prefill_chunk_size
    are refused earlier, by KVMethod's own checks in pos_shift.py / chunked_prefill.py)."""
    if getattr(method, "quant_method", "none") != "none":
        raise ValueError(f"quant_method={method.quant_method!r} with {method.name}'s per-head storage is not "
                         f"supported yet; valid choices: quant_method='none'")


def per_head_keep(prefix_scores: torch.Tensor, head_budgets: Sequence[Sequence[int] | None], seq_len: int,
                  padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's kept positions as a dense union layout: keep [B, H, K] and held [B, H, K] (False =
    slot not kept by that head, to be dropped by the per-head storage).

    head_budgets[b]: prefix tokens per head of row b (None = the row is kept whole); every head of a
    compressed row also keeps the window (the last seq_len - prefix length positions)."""
    batch, heads, prefix_len = prefix_scores.shape
    device = prefix_scores.device
    lengths = [seq_len] * batch if padding_mask is None else [int(n) for n in padding_mask.sum(-1).tolist()]
    per_row = []
    for row in range(batch):
        if head_budgets[row] is None:  # kept whole: its real tokens
            real = torch.arange(seq_len - lengths[row], seq_len, device=device)
            per_row.append([real] * heads)
            continue
        scores = prefix_scores[row]
        if padding_mask is not None:
            scores = scores.masked_fill(~padding_mask[row, None, :prefix_len].bool(), float("-inf"))
        order = scores.sort(dim=-1, descending=True, stable=True).indices
        window = torch.arange(prefix_len, seq_len, device=device)
        per_row.append([torch.cat([order[h, : head_budgets[row][h]].sort().values, window]) for h in range(heads)])
    slots = max(len(kept) for row in per_row for kept in row)
    keep = torch.full((batch, heads, slots), seq_len - 1, dtype=torch.long, device=device)
    held = torch.zeros(batch, heads, slots, dtype=torch.bool, device=device)
    for row, kept_heads in enumerate(per_row):
        for head, kept in enumerate(kept_heads):
            keep[row, head, : len(kept)] = kept
            held[row, head, : len(kept)] = True
    return keep, held


def adaptive_head_budgets(scores: torch.Tensor, prefix_budget: int, floor: int) -> list[int]:
    """Prefix tokens per head of one row: each head's own top `floor`, then the layer-wide top of the
    rest up to heads x prefix_budget. scores [H, P] (-inf = pad, never taken)."""
    heads, prefix_len = scores.shape
    total = heads * prefix_budget
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    forced = torch.zeros_like(scores, dtype=torch.bool)
    forced.scatter_(1, order[:, :floor], True)
    pooled = scores.masked_fill(forced, float("inf")).flatten()
    chosen = pooled.sort(descending=True, stable=True).indices[:total]  # ties: lowest head, then position
    return torch.bincount(chosen // prefix_len, minlength=heads).tolist()


@dataclass
class PerHeadSnapKV(SnapKV):
    """SnapKV's scores with a budget per head (`head_budgets`), stored per head (pyramidkv/perhead.py)."""

    name = "PerHeadSnapKV"

    def __post_init__(self):
        super().__post_init__()
        check_per_head_method(self)

    def new_layer(self, layer_idx: int, num_layers: int):
        from ..perhead import PerHeadLayer  # late: the cache imports the methods

        return PerHeadLayer()

    def head_budgets(self, x: PrefillInputs, prefix_scores: torch.Tensor, row: int, prefix_budget: int) -> list[int]:
        """Prefix tokens each stored head of `row` keeps, given the uniform per-head `prefix_budget`."""
        raise NotImplementedError

    def compress(self, x: PrefillInputs, budget):
        keys, values = self.stored_states(x)
        row_budgets = _row_budgets(budget, x)
        lengths = x.real_lengths()
        compressed = [b for b, n in zip(row_budgets, lengths) if b < n]
        window = min(self.window_size, *compressed) if compressed else min(self.window_size, x.seq_len)
        heads = keys.shape[1]
        prefix_scores = None
        if compressed:
            prefix_scores = self.selection_heads(self.score(x, window).float(), x)
        else:
            prefix_scores = keys.new_zeros(keys.shape[0], heads, x.seq_len - window, dtype=torch.float32)
        head_budgets = [None if b >= n else self.head_budgets(x, prefix_scores, row, b - window)
                        for row, (b, n) in enumerate(zip(row_budgets, lengths))]
        keep, held = per_head_keep(prefix_scores, head_budgets, x.seq_len, x.padding_mask)
        x.kept_indices = keep
        bias = torch.zeros(held.shape, dtype=torch.float32, device=held.device).masked_fill(~held, float("-inf"))
        return gather_tokens(keys, keep), gather_tokens(values, keep), bias


@dataclass
class AdaKV(PerHeadSnapKV):
    name = "AdaKV"
    floor_fraction: float = 0.2  # the safeguard: each head keeps at least this share of C - w

    def __post_init__(self):
        super().__post_init__()
        check_finite_number("floor_fraction", self.floor_fraction, minimum=0)
        if self.floor_fraction > 1:
            raise ValueError(f"floor_fraction={self.floor_fraction!r} is invalid: it must lie in [0, 1]")

    def head_budgets(self, x: PrefillInputs, prefix_scores: torch.Tensor, row: int, prefix_budget: int) -> list[int]:
        scores = prefix_scores[row]
        if x.padding_mask is not None:
            scores = scores.masked_fill(~x.padding_mask[row, None, : scores.shape[-1]].bool(), float("-inf"))
        return adaptive_head_budgets(scores, prefix_budget, int(self.floor_fraction * prefix_budget))


@dataclass
class AdaPyramidKV(AdaKV):
    """AdaKV's per-head allocation inside PyramidKV's per-layer budgets."""

    name = "Ada-PyramidKV"
    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        check_finite_number("beta", self.beta, minimum=1)

    layer_budgets = PyramidKV.layer_budgets
