"""ChunkKV — Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
LLM Inference" (arXiv:2502.00299).

Keeps spans instead of single tokens: the prefix is cut into chunks of `chunk_size` consecutive tokens
(counted from each row's first real token, so left padding does not move the boundaries), a chunk's
score is the observation window's attention summed over its tokens, and the best chunks are kept
whole. With `shared_heads=True` (the paper's form) the scores are also summed over the layer's KV
heads, so every head keeps the same chunks. No pooling: the chunk is the clustering step. When the
budget does not end on a chunk boundary the last chosen chunk keeps its first tokens.
"""

from dataclasses import dataclass

import torch

from .base import KVMethod, PrefillInputs, window_attention


@dataclass
class ChunkKV(KVMethod):
    name = "ChunkKV"
    chunk_size: int = 10
    shared_heads: bool = True

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} is invalid: it must be a positive integer")
        if not isinstance(self.shared_heads, bool):
            raise ValueError(f"shared_heads={self.shared_heads!r} is invalid: it must be True or False")

    def score(self, x: PrefillInputs, window: int):
        prefix = x.seq_len - window
        votes = window_attention(x, window)[..., :prefix].sum(dim=-2)  # [B, Hq, prefix]
        votes = self.selection_heads(votes.float(), x)  # [B, stored heads, prefix] (see gqa_selection)
        batch, heads, _ = votes.shape
        pads = torch.zeros(batch, dtype=torch.long, device=votes.device)
        if x.padding_mask is not None:
            pads = (~x.padding_mask.bool()).sum(-1)
        position = torch.arange(prefix, device=votes.device)[None, :] - pads[:, None]
        chunk = (position.clamp(min=0) // self.chunk_size)[:, None, :].expand(batch, heads, prefix)
        totals = torch.zeros_like(votes).scatter_add_(-1, chunk, votes)
        if self.shared_heads:
            totals = totals.sum(dim=1, keepdim=True).expand_as(totals)
        return totals.gather(-1, chunk)
