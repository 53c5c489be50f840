"""KeepKV as the SimCalKV authors' baseline implements it (github.com/William-kaihhu/SimCalKV,
task_evaluation/*/merge_keepkv*.py; after the paper "KeepKV: Eliminating Output Perturbation in KV
Cache Compression", 2025).

Same selection and matching as SimCalKV (accumulated-attention eviction, each evicted key joins its most
cosine-similar kept key above `sim_threshold`), but keys AND values are merged as means weighted by
exp(q.k/sqrt(d)) of the last prompt query; no logit bias. The released code overwrites a slot when
several evicted tokens pick it (the last one wins) below ratio 0.5 and averages them first above it;
here every token merged into a slot enters its weighted mean.
"""

from dataclasses import dataclass

from .h2o import H2O
from .merging import Matches, check_similarity_threshold, match_evicted


@dataclass
class KeepKV(H2O):
    name = "KeepKV"
    has_decode_form = False  # H2O's decode rule does not apply to its prefill form
    sim_threshold: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_similarity_threshold(self.sim_threshold)

    def compress(self, x, budget):
        m = match_evicted(self, x, budget, self.sim_threshold, self.chunk_elements)
        if not isinstance(m, Matches):
            return m
        dtype = x.keys.dtype
        keys = m.weighted_mean(m.slot_keys, m.evicted_keys)
        return keys.to(dtype), m.weighted_mean(m.slot_values, m.evicted_values).to(dtype)
