"""StreamingLLM — Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024,
arXiv:2309.17453).

Keeps the first `sink_size` tokens (attention sinks) and the most recent ones. When the prefix budget
(max_capacity_prompt - window) is smaller than sink_size, the FIRST min(sink_size, prefix budget)
tokens are kept. Positions stay the TRUE positions (the cache keeps each token's original RoPE
rotation); the paper's variant that re-rotates keys to cache positions is not implemented.
`skip_layers` (layer indices or a count of first layers; default none) are left whole, as CS3602's
streaming_llm / recent_only allow (their parameter aliases, see methods/__init__.py).
Rolling form (`max_cache_size` or `compress_interval` set): the same rule re-applied to the cache while
decoding (methods/decode.py), so each layer keeps the sinks and the most recent tokens at every step.
"""

from dataclasses import dataclass

import torch

from .base import KVMethod, PrefillInputs, layer_indices


@dataclass
class StreamingLLM(KVMethod):
    name = "StreamingLLM"
    needs_queries = False  # key-only
    has_decode_form = True  # the prefill rule re-applied to the cache (methods/decode.py)
    sink_size: int = 4
    # None = no layer skipped (None, not (), so stored run settings of earlier runs still match)
    skip_layers: int | tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.skip_layers is not None:
            self.skip_layers = layer_indices("skip_layers", self.skip_layers)
        if isinstance(self.sink_size, bool) or not isinstance(self.sink_size, int) or self.sink_size < 0:
            raise ValueError(f"sink_size={self.sink_size!r} is invalid: it must be a non-negative integer")
        if self.max_cache_size is not None and self.max_cache_size <= self.sink_size:
            raise ValueError(f"max_cache_size={self.max_cache_size} must be larger than sink_size={self.sink_size} "
                             f"(start_size): the cache holds the sinks plus at least one recent token")

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        kept = min(self.capacity(seq_len), seq_len)
        skipped = self.skip_layers or ()
        return [seq_len if layer in skipped else kept for layer in range(num_layers)]

    def score(self, x: PrefillInputs, window: int):
        batch, heads = x.keys.shape[:2]
        prefix_len = x.seq_len - window
        position = torch.arange(prefix_len, device=x.keys.device, dtype=torch.float32)
        first_real = torch.zeros(batch, 1, device=x.keys.device)
        if x.padding_mask is not None:
            first_real = (x.seq_len - x.padding_mask.sum(-1, keepdim=True)).float()
        is_sink = (position[None, :] >= first_real) & (position[None, :] < first_real + self.sink_size)
        # sinks above every other token, the earliest sink highest (a budget below sink_size keeps the
        # first sinks); the other tokens by recency
        scores = torch.where(is_sink, 3 * x.seq_len - position, position)
        return scores[:, None, :].expand(batch, heads, prefix_len)
