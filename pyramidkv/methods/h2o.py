"""H2O — Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv:2306.14048).

Score = attention accumulated over ALL prompt queries (causal column sums); keep the heavy hitters
plus the most recent `window_size` tokens. This is the prefill (one-shot) form used by KVCache-Factory;
the original also evicts greedily during decoding, which is not done here.
"""

from dataclasses import dataclass

import torch

from .base import KVMethod, PrefillInputs, repeat_kv


@dataclass
class H2O(KVMethod):
    name = "H2O"
    # query rows per chunk are chosen so that one chunk's logits stay below this many elements
    chunk_elements: int = 1 << 25

    def score(self, x: PrefillInputs, window: int):
        seq_len = x.seq_len
        keys = repeat_kv(x.keys, x.num_kv_groups).float()
        batch, heads = x.query.shape[:2]
        rows = max(1, self.chunk_elements // (batch * heads * seq_len))
        k_pos = torch.arange(seq_len, device=keys.device)
        totals = torch.zeros(batch, heads, seq_len, device=keys.device)
        for start in range(0, seq_len, rows):
            q = x.query[:, :, start : start + rows].float()
            logits = torch.matmul(q, keys.transpose(2, 3)) * x.scaling
            q_pos = torch.arange(start, start + q.shape[2], device=keys.device)
            visible = (k_pos[None, :] <= q_pos[:, None])[None, None]
            if x.padding_mask is not None:
                real = x.padding_mask.bool()
                visible = visible & real[:, None, None, :] & real[:, None, start : start + q.shape[2], None]
            probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            totals += torch.nan_to_num(probs, nan=0.0).sum(dim=2)  # pad query rows are all-masked -> NaN
        return totals[..., : seq_len - window]  # per query head; the base groups them
