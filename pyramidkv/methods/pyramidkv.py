"""PyramidKV — Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (arXiv:2406.02069).

SnapKV scoring with per-layer budgets that decrease arithmetically with depth: lower layers attend
broadly, upper layers focus on few tokens. With C = max_capacity_prompt (or the row's ratio budget),
w = window, L layers, s prompt tokens: min = (C-w)/beta, max = 2(C-w) - min (if max >= s-w: max = s-w, min = 2(C-w) - max); layer l
keeps max - (max-min)*l/(L-1) prefix tokens plus the window. Falls back to uniform budgets when
s < 2(C-w). Unlike KVCache-Factory's integer steps (which overshoot, e.g. 4016 vs 3840 tokens at C=128,
w=8, L=32), our integer budgets sum to exactly L*(C-w) prefix tokens.

In a left-padded batch the schedule is computed per row, from that row's real length, so every row
equals its own single-row run (the cache stores the largest row's count per layer and hides the
shorter rows' filler slots).
"""

import math
from dataclasses import dataclass

from .base import check_finite_number
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    name = "PyramidKV"
    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        check_finite_number("beta", self.beta, minimum=1)

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        capacity = self.capacity(seq_len)  # the token budget, or this row's ratio of its length
        per_layer = capacity - self.window_size
        if seq_len <= capacity:
            return [seq_len] * num_layers
        if num_layers == 1 or per_layer <= 0 or seq_len < 2 * per_layer:
            return [capacity] * num_layers
        cap = seq_len - self.window_size
        low = per_layer / self.beta
        high = 2 * per_layer - low
        if high >= cap:
            high = cap
            low = 2 * per_layer - high
        steps = [high - (high - low) * layer / (num_layers - 1) for layer in range(num_layers)]
        prefix = [math.floor(s) for s in steps]
        remainder = per_layer * num_layers - sum(prefix)
        # the rounding remainder goes to the first layers, which keeps the budgets non-increasing;
        # a layer already holding the whole prefix is skipped
        layer = 0
        while remainder > 0:
            if prefix[layer] < cap:
                prefix[layer] += 1
                remainder -= 1
            layer = (layer + 1) % num_layers
        return [p + self.window_size for p in prefix]
