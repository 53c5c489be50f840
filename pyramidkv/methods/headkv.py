"""HeadKV — Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated
Retrieval and Reasoning" (arXiv:2410.19258).

Per-head budgets from offline head importance scores (retrieval heads found with needle prompts):
with C = max_capacity_prompt, w = window, L layers and H KV heads, the model keeps L x H x (C - w)
prefix tokens in all (as SnapKV). Each head keeps a base of (1 - pool_fraction) x (C - w); the rest
forms one pool shared by all heads of all layers, given out in proportion to the heads' scores (a head
never gets more than its row's prefix; what it cannot take goes to the others by score). Inside a head,
tokens are chosen by SnapKV's pooled window votes; the window is always kept. The structure (base per
head + a shared pool split by importance) is the paper's; `pool_fraction` is our name for how much of
each head's budget goes to the pool.

Scores file (JSON, `scores_file`; default: the SmolLM2 file computed by scripts/headkv_scores.py):
    {"model": "...", "scores": [[s_00, s_01, ...], ...]}
`scores` is [layers][KV heads], or [layers][query heads] (averaged over each GQA group). A file of
another shape is a one-line error naming both shapes.

Storage: pyramidkv/perhead.py (each head holds only its own tokens).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import torch

from .adakv import PerHeadSnapKV
from .base import PrefillInputs

DEFAULT_SCORES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference", "headkv",
                              "SmolLM2-135M-Instruct.json")


@functools.lru_cache(maxsize=8)
def _read_scores(path: str) -> tuple[tuple[float, ...], ...]:
    if not os.path.isfile(path):
        raise ValueError(f"scores_file={path!r} does not exist; compute one with scripts/headkv_scores.py")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows) \
            or len({len(r) for r in rows}) != 1:
        raise ValueError(f"scores_file={path!r} has no rectangular 'scores' list [layers][heads]")
    values = [[float(v) for v in row] for row in rows]
    if not all(math.isfinite(v) and v >= 0 for row in values for v in row):
        raise ValueError(f"scores_file={path!r} holds negative or non-finite scores; scores must be >= 0")
    return tuple(tuple(row) for row in values)


def load_head_scores(path: str, num_layers: int, query_heads: int, kv_heads: int, stored_heads: int) -> torch.Tensor:
    """Scores [layers, stored heads] from the file (query-head scores averaged per GQA group; KV-head
    scores repeated to query heads when the cache stores query heads)."""
    scores = torch.tensor(_read_scores(path), dtype=torch.float64)
    if tuple(scores.shape) not in ((num_layers, kv_heads), (num_layers, query_heads)):
        raise ValueError(f"scores_file={path!r} holds scores of shape [{scores.shape[0]}, {scores.shape[1]}]; this "
                         f"model needs [{num_layers}, {kv_heads}] (layers, KV heads) or [{num_layers}, {query_heads}] "
                         f"(layers, query heads)")
    groups = query_heads // kv_heads
    if scores.shape[1] != stored_heads:
        if stored_heads == kv_heads:
            scores = scores.reshape(num_layers, kv_heads, groups).mean(-1)
        else:
            scores = scores.repeat_interleave(groups, dim=1)
    return scores


def distribute(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Integers summing to min(total, sum(caps)), in proportion to `weights` (largest remainders),
    none above its cap; what a capped entry cannot take goes to the others."""
    given = [0] * len(weights)
    while True:
        room = [i for i, (g, c) in enumerate(zip(given, caps)) if g < c]
        left = total - sum(given)
        if left <= 0 or not room:
            return given
        weight = [weights[i] for i in room]
        if sum(weight) <= 0:
            weight = [1.0] * len(room)
        shares = [left * w / sum(weight) for w in weight]
        whole = [math.floor(s) for s in shares]
        for rank in sorted(range(len(room)), key=lambda k: (whole[k] - shares[k], k))[: left - sum(whole)]:
            whole[rank] += 1
        for i, extra in zip(room, whole):
            given[i] += min(extra, caps[i] - given[i])


@dataclass
class HeadKV(PerHeadSnapKV):
    name = "HeadKV"
    scores_file: str = DEFAULT_SCORES
    pool_fraction: float = 0.8  # share of each head's prefix budget that goes into the shared pool

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.pool_fraction, bool) or not isinstance(self.pool_fraction, (int, float)) \
                or not 0 <= self.pool_fraction <= 1:
            raise ValueError(f"pool_fraction={self.pool_fraction!r} is invalid: it must lie in [0, 1]")
        self._budget_tables: dict = {}

    def budget_table(self, x: PrefillInputs, heads: int, prefix_budget: int, prefix_len: int) -> list[list[int]]:
        """Prefix tokens per [layer][stored head] for a row with `prefix_len` real prefix tokens."""
        key = (heads, prefix_budget, prefix_len, x.num_layers)
        if key not in self._budget_tables:
            scores = load_head_scores(self.scores_file, x.num_layers, x.query.shape[1], x.keys.shape[1], heads)
            base = min(prefix_len, math.floor((1 - self.pool_fraction) * prefix_budget))
            count = x.num_layers * heads
            pool = count * prefix_budget - count * base
            extra = distribute(pool, scores.flatten().tolist(), [prefix_len - base] * count)
            self._budget_tables[key] = [[base + e for e in extra[layer * heads : (layer + 1) * heads]]
                                        for layer in range(x.num_layers)]
        return self._budget_tables[key]

    def head_budgets(self, x: PrefillInputs, prefix_scores: torch.Tensor, row: int, prefix_budget: int) -> list[int]:
        heads = prefix_scores.shape[1]
        window = x.seq_len - prefix_scores.shape[-1]
        prefix_len = x.real_lengths()[row] - window
        return self.budget_table(x, heads, prefix_budget, prefix_len)[x.layer_idx]
