"""SnapKV — Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024,
arXiv:2404.14469).

The last `window_size` prompt queries (the observation window) vote for prefix tokens with their
softmax attention; votes are pooled over neighbouring tokens; each KV head keeps its top
(max_capacity_prompt - window_size) prefix tokens plus the window.
Paper defaults: window 32, kernel 7, maxpool. Our defaults (window 8, kernel 7, maxpool) are those of
KVCache-Factory's LongBench runs, which the PyramidKV tables use; both are settable.
"""

from dataclasses import dataclass

from .base import KVMethod, PrefillInputs, pool_votes, window_attention


@dataclass
class SnapKV(KVMethod):
    name = "SnapKV"

    def score(self, x: PrefillInputs, window: int):
        attn = window_attention(x, window)  # [B, Hq, w, S]
        votes = attn[..., : x.seq_len - window].sum(dim=-2)  # [B, Hq, S - w]
        return pool_votes(votes, self.kernel_size, self.pooling)  # per query head; the base groups them
