"""CaM — Zhang, Du, Luo, Zhong, Zhang, Liu, Ji, "CaM: Cache Merging for Memory-efficient LLMs
Inference" (ICML 2024, openreview.net/forum?id=LCTmppB165).

Prefill form: tokens are evicted by accumulated attention Ā (H2O's column sums over every prompt query;
per KV head the mean over its query-head group), the observation window kept. An evicted token i is
merged into the next m kept slots after it (m = `merge_window`, default: the observation window): with
probability p_i = clamp(Ā_i / mean(Ā of those m slots), 0, 1) (one Bernoulli draw per evicted token
and head) each of them gets v_i / m added to its value; keys are not merged. Near the end of the prompt
a token may have fewer than m kept slots after it: those it has get v_i / m each, and the mean runs
over them.

The draws are seeded (`seed`, and the layer) and positioned from each row's first real token, so a
padded row draws what its single run draws; everything is vectorised (a range-add over slots via
cumulative sums), unlike the loop per token with batch index 0 of KVCache-Factory. CaM's per-decode-step
form (merging as decoding evicts) needs decode-time compression and is not here.
"""

from dataclasses import dataclass

import torch

from .base import _row_budgets, gather_tokens
from .h2o import H2O
from .merging import gather_positions, split_kept_evicted


@dataclass
class CaM(H2O):
    name = "CaM"
    has_decode_form = False  # H2O's decode rule does not apply to its prefill form
    merge_window: int | None = None  # m; None = window_size
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        m = self.merge_window
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"merge_window={m!r} is invalid: it must be a positive integer (None = window_size)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid: it must be an integer")

    def compress(self, x, budget):
        keys, values = self.stored_states(x)
        accumulated = self.score(x, 0)  # [B, Hq, S]
        keep = self.select(x, budget, full_scores=accumulated)
        if keep is None:
            return keys, values
        accumulated = self.selection_heads(accumulated.float(), x)  # [B, stored heads, S]
        split = split_kept_evicted(x, keep, _row_budgets(budget, x))
        slot_keys, slot_values = gather_tokens(keys, keep), gather_tokens(values, keep).float()
        m = self.merge_window or self.window_size
        slots = keep.shape[-1]
        # first kept slot after each evicted token (fillers read as position -1: never after anything)
        real_positions = torch.where(split.slot_is_real, keep, -1)
        first = torch.searchsorted(real_positions.contiguous(), split.evicted.contiguous(), right=True)
        last = (first + m).clamp(max=slots)  # one past the last target slot
        span = (last - first).float()
        # mean Ā over the target slots from prefix sums over the slots
        slot_scores = gather_positions(accumulated, keep)
        prefix = torch.nn.functional.pad(slot_scores.cumsum(-1), (1, 0))
        target_mean = (prefix.gather(-1, last) - prefix.gather(-1, first)) / span.clamp(min=1)
        evicted_scores = gather_positions(accumulated, split.evicted)
        probability = (evicted_scores / target_mean.clamp(min=1e-12)).clamp(0, 1)
        draws = self._uniform_draws(x, keys.shape[1]).gather(-1, split.evicted)
        merged = split.evicted_valid & (draws < probability) & (span > 0)
        added = gather_tokens(values, split.evicted).float() * (merged.float() / m)[..., None]
        # range-add: +added at the first target slot, -added one past the last, then a running sum
        delta = slot_values.new_zeros(*slot_values.shape[:2], slots + 1, slot_values.shape[-1])
        delta.scatter_add_(2, first[..., None].expand_as(added), added)
        delta.scatter_add_(2, last[..., None].expand_as(added), -added)
        merged_values = slot_values + delta.cumsum(dim=2)[:, :, :slots]
        return slot_keys, merged_values.to(values.dtype)

    def _uniform_draws(self, x, heads: int) -> torch.Tensor:
        """Uniform [0, 1) draws [B, heads, S]: row b's real tokens get the draws of its single run."""
        device = x.keys.device
        draws = torch.ones(x.keys.shape[0], heads, x.seq_len, device=device)
        generator = torch.Generator(device=device)
        for row, length in enumerate(x.real_lengths()):
            generator.manual_seed(self.seed * 1_000_003 + x.layer_idx)
            draws[row, :, x.seq_len - length :] = torch.rand(heads, length, generator=generator, device=device)
        return draws
