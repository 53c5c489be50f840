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
cumulative sums), unlike the loop per token with batch index 0 of KVCache-Factory.

Decode form (`max_cache_size`, CaM's generation setting): H2O's decode rule evicts (accumulated
attention carried across steps; heavy + recent budgets), and each token evicted at a step is merged
the same way into the next m kept slots after it, with Ā the accumulated attention at that step.
The step's draws are seeded by (`seed`, layer, decode step), one generator per row, so a padded row
draws what its single run draws. With CaM's --start_ratio / --recent_ratio (`heavy_ratio`,
`recent_ratio`: H2O's ratio form, each row's budgets from its own prompt length) the eviction is the
same; m stays `merge_window`, else window_size (8), not the per-row recent budget.
"""

from dataclasses import dataclass

import torch

from .base import _row_budgets, gather_tokens
from .h2o import H2O
from .merging import gather_positions, split_kept_evicted


@dataclass
class CaM(H2O):
    name = "CaM"
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
        x.kept_indices = keep  # the decode form's carried state follows the kept slots
        if keep is None:
            return keys, values
        accumulated = self.selection_heads(accumulated.float(), x)  # [B, stored heads, S]
        split = split_kept_evicted(x, keep, _row_budgets(budget, x))
        draws = self._uniform_draws(x, keys.shape[1]).gather(-1, split.evicted)
        return gather_tokens(keys, keep), self._merge_following(split, accumulated, values, draws)

    def decode_select(self, d, budgets):
        keep = super().decode_select(d, budgets)  # H2O's rule (the accumulated attention is d.state's)
        split = split_kept_evicted(d.as_prefill(), keep, budgets)
        if split.evicted.shape[-1] == 0:
            return keep
        draws = torch.stack([torch.rand(*split.evicted.shape[1:], device=keep.device,
                                        generator=self._generator(d.layer_idx, d.step, keep.device))
                             for _ in range(keep.shape[0])])
        merged = self._merge_following(split, d.state["accumulated"], d.values, draws)
        # the layer gathers the kept slots from its values next (CompressedLayer.evict): write the merged
        # values into those slots (fillers hold unchanged copies, so their repeated indices are harmless)
        d.values.scatter_(2, keep[..., None].expand(*keep.shape, d.values.shape[-1]), merged)
        return keep

    def _merge_following(self, split, scores, values, draws) -> torch.Tensor:
        """Values of the kept slots after merging each evicted token i into the next m kept slots after
        it, with probability clamp(Ā_i / mean Ā of those slots, 0, 1) against its draw [B, H, E]."""
        keep = split.keep
        slot_values = gather_tokens(values, keep).float()
        m = self.merge_window or self.window_size
        slots = keep.shape[-1]
        # first kept slot after each evicted token (fillers read as position -1: never after anything)
        real_positions = torch.where(split.slot_is_real, keep, -1)
        first = torch.searchsorted(real_positions.contiguous(), split.evicted.contiguous(), right=True)
        last = (first + m).clamp(max=slots)  # one past the last target slot
        span = (last - first).float()
        # mean Ā over the target slots from prefix sums over the slots
        slot_scores = gather_positions(scores, keep)
        prefix = torch.nn.functional.pad(slot_scores.cumsum(-1), (1, 0))
        target_mean = (prefix.gather(-1, last) - prefix.gather(-1, first)) / span.clamp(min=1)
        evicted_scores = gather_positions(scores, split.evicted)
        probability = (evicted_scores / target_mean.clamp(min=1e-12)).clamp(0, 1)
        merged = split.evicted_valid & (draws < probability) & (span > 0)
        added = gather_tokens(values, split.evicted).float() * (merged.float() / m)[..., None]
        # range-add: +added at the first target slot, -added one past the last, then a running sum
        delta = slot_values.new_zeros(*slot_values.shape[:2], slots + 1, slot_values.shape[-1])
        delta.scatter_add_(2, first[..., None].expand_as(added), added)
        delta.scatter_add_(2, last[..., None].expand_as(added), -added)
        return (slot_values + delta.cumsum(dim=2)[:, :, :slots]).to(values.dtype)

    def _generator(self, layer_idx: int, step: int, device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + layer_idx) * 1_000_033 + step)
        return generator

    def _uniform_draws(self, x, heads: int) -> torch.Tensor:
        """Uniform [0, 1) draws [B, heads, S]: row b's real tokens get the draws of its single run."""
        device = x.keys.device
        draws = torch.ones(x.keys.shape[0], heads, x.seq_len, device=device)
        generator = torch.Generator(device=device)
        for row, length in enumerate(x.real_lengths()):
            generator.manual_seed(self.seed * 1_000_003 + x.layer_idx)
            draws[row, :, x.seq_len - length :] = torch.rand(heads, length, generator=generator, device=device)
        return draws
