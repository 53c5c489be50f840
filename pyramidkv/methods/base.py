"""What every compression method shares: its config, validation, and the keep-top-k-plus-window rule.

A method sees one layer's prefill through :class:`PrefillInputs` and returns, per KV head, the indices
of the prompt tokens to keep (:meth:`KVMethod.select`). Scorer methods only implement :meth:`score`;
the base class handles budgets, the observation window, left padding and GQA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

POOLINGS = ("avgpool", "maxpool")


@dataclass
class PrefillInputs:
    """One layer's prefill, as the attention hook sees it (all post-RoPE)."""

    query: torch.Tensor  # [B, Hq, S, D]
    keys: torch.Tensor  # [B, Hkv, S, D]
    values: torch.Tensor  # [B, Hkv, S, D]
    padding_mask: torch.Tensor | None  # [B, S] bool, True = real token; None = no padding
    layer_idx: int
    num_layers: int
    scaling: float

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    @property
    def num_kv_groups(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]


@dataclass
class KVMethod:
    """Base config shared by all methods.

    max_capacity_prompt: tokens kept per layer and KV head after prefill, observation window included.
    window_size: the last `window_size` prompt tokens are always kept and (for attention-based scorers)
        are the observation window whose queries vote for the prefix.
    kernel_size / pooling: 1-D pooling of the votes (SnapKV's clustering step).
    """

    name: ClassVar[str] = "base"
    max_capacity_prompt: int = 128
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "maxpool"

    def __post_init__(self):
        for field in ("max_capacity_prompt", "window_size", "kernel_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field}={value!r} is invalid: it must be a positive integer")
        if self.max_capacity_prompt <= self.window_size:
            raise ValueError(
                f"max_capacity_prompt={self.max_capacity_prompt} must be larger than "
                f"window_size={self.window_size} (the budget includes the observation window)"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is unknown; valid choices: {', '.join(POOLINGS)}")

    # ---- what subclasses override -------------------------------------------------------------
    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        """Tokens kept per layer (window included); uniform by default."""
        return [min(self.max_capacity_prompt, seq_len)] * num_layers

    def score(self, x: PrefillInputs, window: int) -> torch.Tensor:
        """Scores of the prefix tokens [B, Hkv, S - window]; higher = keep."""
        raise NotImplementedError

    # ---- shared machinery ---------------------------------------------------------------------
    def config(self) -> dict:
        return dataclasses.asdict(self)

    def select(self, x: PrefillInputs, budget: int) -> torch.Tensor | None:
        """Indices [B, Hkv, budget] of the tokens to keep, ascending; None = keep everything."""
        seq_len = x.seq_len
        if budget >= seq_len:
            return None
        window = min(self.window_size, budget)
        prefix_scores = self.score(x, window).float()
        return keep_top_prefix_and_window(prefix_scores, budget - window, seq_len, x.padding_mask)

    def compress(self, x: PrefillInputs, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V to store for this layer. Merging methods override this."""
        keep = self.select(x, budget)
        if keep is None:
            return x.keys, x.values
        return gather_tokens(x.keys, keep), gather_tokens(x.values, keep)


def gather_tokens(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """states [B, H, S, D], keep [B, H, K] -> [B, H, K, D]."""
    index = keep.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
    return states.gather(2, index)


def keep_top_prefix_and_window(
    prefix_scores: torch.Tensor, prefix_budget: int, seq_len: int, padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Top-`prefix_budget` prefix tokens per head (in original order) followed by the window.

    Left padding: pads are never picked. A row whose real length fits the budget keeps its last
    `budget` positions instead, so any kept pad stays on a column the attention mask hides.
    """
    batch, heads, prefix_len = prefix_scores.shape
    window = seq_len - prefix_len
    device = prefix_scores.device
    if padding_mask is not None:
        pad = ~padding_mask[:, None, :prefix_len].bool()
        prefix_scores = prefix_scores.masked_fill(pad, float("-inf"))
        short_rows = padding_mask.sum(-1) <= prefix_budget + window
        recency = torch.arange(prefix_len, device=device, dtype=prefix_scores.dtype).expand_as(prefix_scores)
        prefix_scores = torch.where(short_rows[:, None, None], recency, prefix_scores)
    # stable sort: equal scores (maxpool plateaus) resolve by position, the same with or without padding
    order = prefix_scores.sort(dim=-1, descending=True, stable=True).indices
    top = order[..., :prefix_budget].sort(dim=-1).values
    window_idx = torch.arange(prefix_len, seq_len, device=device).expand(batch, heads, window)
    return torch.cat([top, window_idx], dim=-1)


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
