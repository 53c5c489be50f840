"""SimCalKV — Cheng, Zhou, Li, Qu, Ye, "Efficient LLMs Inference via Similarity-Aware KV Cache Merging
with Bias Calibration" (code: github.com/William-kaihhu/SimCalKV; no paper text was available to us).

Score = column sum of the prefill attention (every prompt query, causal; per KV head the mean over its
query-head group); the lowest tokens are evicted (budget: usually `compress_ratio`, the fraction of
each row's tokens removed; the observation window is always kept, as for every method here). Each
evicted key joins its most cosine-similar kept key of the same head when that similarity exceeds
`sim_threshold` (default 0.0; the authors also try 0.8); dissimilar ones are dropped.

calibration="exact" (default): a kept slot c that absorbs n tokens stores the key (k_c + sum k_e)/(n+1)
and the logit bias ln(n+1), so when the merged keys are equal it draws exactly the attention of the
n+1 tokens (the bias is added by the attention hook: eager/sdpa only).
calibration="released": the authors' released form, ½(mean evicted key + k_c) + ln 2 added to EVERY key
element (a logit shift of ln2 * sum(q)/sqrt(d), which depends on the query), no bias; for comparison.
Both: the value is the mean of v_c and the merged values weighted by exp(q.k/sqrt(d)) of the last
prompt query (post-RoPE; with GQA the mean weight over the group's query heads).

Differences from the released code: it pairs KV head h with query head h on GQA models (query heads
beyond the KV head count are never read); here each KV head aggregates its group. It merges evicted
tokens one after another (repeated halving); here all of a slot's tokens are merged at once. It takes
the last query before RoPE; here after, as attention sees it.
"""

import math
from dataclasses import dataclass

import torch

from .h2o import H2O
from .merging import Matches, check_similarity_threshold, match_evicted

CALIBRATIONS = ("exact", "released")


@dataclass
class SimCalKV(H2O):
    name = "SimCalKV"
    has_decode_form = False  # H2O's decode rule does not apply to its prefill form
    sim_threshold: float = 0.0
    calibration: str = "exact"

    def __post_init__(self):
        super().__post_init__()
        check_similarity_threshold(self.sim_threshold)
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration={self.calibration!r} is unknown; valid choices: {', '.join(CALIBRATIONS)}")

    @property
    def uses_logit_bias(self) -> bool:
        return self.calibration == "exact"

    def compress(self, x, budget):
        matches = match_evicted(self, x, budget, self.sim_threshold, self.chunk_elements)
        if not isinstance(matches, Matches):
            return matches
        keys, values, bias = self.merge(matches)
        dtype = x.keys.dtype
        return keys.to(dtype), values.to(dtype), bias

    def merge(self, m: Matches):
        count = m.count()
        key_sum = m.slot_keys.new_zeros(m.slot_keys.shape).scatter_add_(
            2, m.target[..., None].expand_as(m.evicted_keys), m.merged[..., None] * m.evicted_keys)
        values = m.weighted_mean(m.slot_values, m.evicted_values)
        if self.calibration == "exact":
            keys = (m.slot_keys + key_sum) / (1 + count)[..., None]
            return keys, values, torch.log1p(count)
        mean_evicted = key_sum / count.clamp(min=1)[..., None]
        released = 0.5 * (mean_evicted + m.slot_keys) + math.log(2)
        return torch.where((count > 0)[..., None], released, m.slot_keys), values, None
