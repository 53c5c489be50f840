"""H2O — Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv:2306.14048).

Score = attention accumulated over ALL prompt queries (causal column sums); keep the heavy hitters
plus the most recent `window_size` tokens. This is the prefill (one-shot) form used by KVCache-Factory.

Decode form (H2O as published; on with `max_cache_size`): every slot carries its accumulated attention
(the prompt's column sums at prefill, then + each decode query's attention, per KV head the mean over
its query-head group); at each step the cache keeps the last `window_size` slots (recent budget) and
the `max_cache_size - window_size` slots of highest accumulated attention (heavy budget): with one new
token per step, one eviction per step.
"""

from dataclasses import dataclass

import torch

from .base import KVMethod, PrefillInputs, group_mean, keep_top_prefix_and_window


@dataclass
class H2O(KVMethod):
    name = "H2O"
    has_decode_form = True
    # query rows per chunk are chosen so that one chunk's logits stay below this many elements
    chunk_elements: int = 1 << 25

    def __post_init__(self):
        super().__post_init__()
        if self.max_cache_size is not None and self.max_cache_size <= self.window_size:
            raise ValueError(f"max_cache_size={self.max_cache_size} must be larger than window_size="
                             f"{self.window_size} (the recent budget is part of the cache)")

    def decode_prefill_state(self, x, keep):
        sums = self.selection_heads(self.score(x, 0).float(), x)  # [B, stored heads, S]
        return {"accumulated": sums if keep is None else sums.gather(-1, keep)}

    def decode_observe(self, d):
        attention = d.attention.sum(dim=2)  # [B, Hq, P]: every new query's attention
        heads = d.keys.shape[1]
        if attention.shape[1] != heads:
            attention = group_mean(attention, attention.shape[1] // heads)
        accumulated = d.padded_state("accumulated")
        d.state["accumulated"] = attention if accumulated is None else accumulated + attention

    def decode_select(self, d, budgets):
        window = min(self.window_size, *budgets)
        scores = d.state["accumulated"][..., : d.slots - window]
        return keep_top_prefix_and_window(scores, budgets, d.slots, None if not bool(d.hidden.any()) else ~d.hidden)

    def score(self, x: PrefillInputs, window: int):
        """Column sums of the causal prompt attention, per query head [B, Hq, S - window] (fp32).

        Cost: the prompt's Q.K^T and softmax again (O(S^2 * D) per head), computed per chunk of query
        rows; a chunk [start, end) only reads the keys before `end` (causal), which halves the work,
        and GQA groups become extra query rows of one matmul per KV head (no repeated keys). At least 8
        chunks, so that skipping the keys after each chunk saves ~45% of the work. The sums are kept on
        `x` (per chunk size): a sweep that compresses one recorded prefill with several accumulated-
        attention methods (pyramidkv.shared_prefill) computes them once per layer."""
        memo = getattr(x, "_column_sums", {})
        if self.chunk_elements not in memo:
            memo[self.chunk_elements] = self._column_sums(x)
            x._column_sums = memo
        return memo[self.chunk_elements][..., : x.seq_len - window]  # per query head; the base groups them

    def _column_sums(self, x: PrefillInputs) -> torch.Tensor:
        seq_len = x.seq_len
        batch, heads, _, dim = x.query.shape
        kv_heads, groups = x.keys.shape[1], x.num_kv_groups
        keys = x.keys.float()
        rows = max(1, min(self.chunk_elements // (batch * heads * seq_len), -(-seq_len // 8)))
        totals = torch.zeros(batch, heads, seq_len, device=keys.device)
        real = None if x.padding_mask is None else x.padding_mask.bool()
        for start in range(0, seq_len, rows):
            end = min(seq_len, start + rows)
            q = x.query[:, :, start:end].float().reshape(batch, kv_heads, groups * (end - start), dim)
            logits = torch.matmul(q, keys[:, :, :end].transpose(2, 3)).view(batch, heads, end - start, end)
            logits.mul_(x.scaling)
            hidden = torch.arange(end, device=keys.device)[None, :] > torch.arange(start, end, device=keys.device)[:, None]
            hidden = hidden[None, None]
            if real is not None:
                hidden = hidden | ~real[:, None, None, :end] | ~real[:, None, start:end, None]
            probs = torch.softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
            if real is not None:
                probs = torch.nan_to_num_(probs, nan=0.0)  # pad query rows are all-masked -> NaN
            totals[..., :end] += probs.sum(dim=2)
        return totals
