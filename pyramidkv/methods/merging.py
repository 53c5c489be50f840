"""What the merging methods share (SimCalKV, KeepKV, CaM): which prompt tokens a layer evicts, which
kept slot each evicted key is most similar to, and the last prompt query's attention weights.

Everything is per row and per stored head, vectorised over the batch: a row's kept slots are its last
kept_b slots (filler slots before them are never merge targets), its evicted tokens are its real tokens
that no slot holds (pads are never merged), listed ascending in [B, H, E] with a validity mask (E: the
largest row's count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import PrefillInputs, _row_budgets, gather_tokens


@dataclass
class Eviction:
    """One layer's split of the prompt into kept slots and evicted tokens."""

    keep: torch.Tensor  # [B, H, K] positions held by each slot (ascending after the fillers)
    slot_is_real: torch.Tensor  # [B, 1, K] bool, False = filler slot (hidden, never a merge target)
    evicted: torch.Tensor  # [B, H, E] positions of evicted tokens (ascending; padded entries arbitrary)
    evicted_valid: torch.Tensor  # [B, H, E] bool


def split_kept_evicted(x: PrefillInputs, keep: torch.Tensor, budgets: list[int]) -> Eviction:
    """Kept slots and evicted tokens of this layer from `select`'s indices and the per-row budgets."""
    batch, heads, slots = keep.shape
    seq_len = x.seq_len
    lengths = x.real_lengths()
    kept = [min(b, seq_len, n) for b, n in zip(budgets, lengths)]
    device = keep.device
    slot_is_real = torch.arange(slots, device=device)[None, :] >= torch.tensor(
        [slots - k for k in kept], device=device)[:, None]  # [B, K]
    real = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if x.padding_mask is not None:
        real = x.padding_mask.bool()
    # a filler slot may repeat a kept position: mark through the real slots only (fillers point at the
    # last slot, which is always real)
    real_positions = torch.where(slot_is_real[:, None, :], keep, keep[..., -1:])
    held = torch.zeros(batch, heads, seq_len, dtype=torch.bool, device=device)
    held.scatter_(-1, real_positions, True)
    evicted_mask = real[:, None, :] & ~held
    count = max([n - k for n, k in zip(lengths, kept)] + [0])
    # evicted positions first, each group ascending (stable sort of the boolean mask)
    order = (~evicted_mask).to(torch.uint8).sort(dim=-1, stable=True).indices[..., :count]
    valid = evicted_mask.gather(-1, order)
    return Eviction(keep, slot_is_real[:, None, :], order, valid)


def most_similar_slot(evicted_keys: torch.Tensor, slot_keys: torch.Tensor, slot_is_real: torch.Tensor,
                      chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each evicted key to its most similar real kept slot of the same head, and
    that slot: ([B, H, E], [B, H, E]).

    Cost: B*H*E*K*D multiply-adds (E evicted, K kept; at compress_ratio r on n tokens E*K = r(1-r)n^2,
    the O(n^2) step); memory is bounded by chunking the evicted tokens so that one chunk's similarity
    matrix holds at most `chunk_elements` floats (1<<25 = 128 MiB in fp32), whatever n is."""
    batch, heads, count, _ = evicted_keys.shape
    slots = slot_keys.shape[2]
    slot_unit = F.normalize(slot_keys.float(), dim=-1)
    best_sim = evicted_keys.new_full((batch, heads, count), float("-inf"), dtype=torch.float32)
    best_slot = torch.zeros(batch, heads, count, dtype=torch.long, device=evicted_keys.device)
    rows = max(1, chunk_elements // max(1, batch * heads * slots))
    hidden = ~slot_is_real[:, :, None, :]  # [B, 1, 1, K]
    for start in range(0, count, rows):
        unit = F.normalize(evicted_keys[:, :, start : start + rows].float(), dim=-1)
        similarity = torch.matmul(unit, slot_unit.transpose(2, 3)).masked_fill_(hidden, float("-inf"))
        best_sim[:, :, start : start + rows], best_slot[:, :, start : start + rows] = similarity.max(dim=-1)
    return best_sim, best_slot


def last_query_log_weights(x: PrefillInputs, stored_keys: torch.Tensor) -> torch.Tensor:
    """log of the attention weight exp(q.k * scaling) of the LAST prompt query (post-RoPE) on every token,
    per stored head [B, H, S] (fp32). With GQA a stored KV head averages the weights of its group's query
    heads (log-mean-exp), so each group member counts."""
    batch, query_heads, _, dim = x.query.shape
    heads = stored_keys.shape[1]
    groups = query_heads // heads
    query = x.query[:, :, -1].float().reshape(batch, heads, groups, dim)
    logits = torch.matmul(query, stored_keys.float().transpose(2, 3)) * x.scaling  # [B, H, G, S]
    log_weights = torch.logsumexp(logits, dim=2) - math.log(groups)
    # shifting every token of a head by one constant leaves each weighted mean unchanged and keeps exp
    # finite; the constant is the largest real token's (a pad's key may be anything)
    shift = log_weights
    if x.padding_mask is not None:
        shift = log_weights.masked_fill(~x.padding_mask.bool()[:, None, :], float("-inf"))
    return log_weights - shift.amax(dim=-1, keepdim=True)


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """states [B, H, S] or [B, H, S, D] at positions [B, H, N]."""
    if states.dim() == 4:
        return gather_tokens(states, positions)
    return states.gather(-1, positions)


def scatter_to_slots(values: torch.Tensor, slot: torch.Tensor, slots: int) -> torch.Tensor:
    """Sum of `values` ([B, H, E] or [B, H, E, D]) per target slot ([B, H, E]) -> [B, H, K(, D)]."""
    if values.dim() == 3:
        return values.new_zeros(*values.shape[:2], slots).scatter_add_(-1, slot, values)
    index = slot.unsqueeze(-1).expand_as(values)
    return values.new_zeros(*values.shape[:2], slots, values.shape[-1]).scatter_add_(2, index, values)


@dataclass
class Matches:
    """Evicted tokens matched to kept slots, with what the merge formulas need (fp32)."""

    slot_keys: torch.Tensor  # [B, H, K, D]
    slot_values: torch.Tensor  # [B, H, K, D]
    evicted_keys: torch.Tensor  # [B, H, E, D]
    evicted_values: torch.Tensor  # [B, H, E, D]
    target: torch.Tensor  # [B, H, E] slot each evicted token joins
    merged: torch.Tensor  # [B, H, E] float 1 = merged into its target (real, similar enough), else 0
    slot_weight: torch.Tensor  # [B, H, K] exp(q_last . k * scaling) of the slot's own key (shifted)
    evicted_weight: torch.Tensor  # [B, H, E] the same for evicted keys, 0 where not merged

    def count(self) -> torch.Tensor:
        """Tokens merged into each slot [B, H, K]."""
        return scatter_to_slots(self.merged, self.target, self.slot_keys.shape[2])

    def weighted_mean(self, slot_states: torch.Tensor, evicted_states: torch.Tensor) -> torch.Tensor:
        """Per slot: (w_c s_c + sum of w_e s_e over its merged tokens) / (w_c + sum of w_e)."""
        slots = slot_states.shape[2]
        numerator = self.slot_weight[..., None] * slot_states + scatter_to_slots(
            self.evicted_weight[..., None] * evicted_states, self.target, slots)
        denominator = self.slot_weight + scatter_to_slots(self.evicted_weight, self.target, slots)
        return numerator / denominator[..., None]


def match_evicted(method, x: PrefillInputs, budget, sim_threshold: float, chunk_elements: int):
    """Select with accumulated-attention scores (H2O's column sums, `method.score`), then match every
    evicted key to its most cosine-similar kept key of the same stored head. Returns (keys, values) to
    store unchanged when nothing is evicted, else Matches."""
    keys, values = method.stored_states(x)
    full_scores = method.score(x, 0)  # column sums over every prompt query, all S tokens
    keep = method.select(x, budget, full_scores=full_scores)
    if keep is None:
        return keys, values
    split = split_kept_evicted(x, keep, _row_budgets(budget, x))
    slot_keys, slot_values = gather_tokens(keys, keep).float(), gather_tokens(values, keep).float()
    evicted_keys = gather_tokens(keys, split.evicted).float()
    evicted_values = gather_tokens(values, split.evicted).float()
    similarity, target = most_similar_slot(evicted_keys, slot_keys, split.slot_is_real, chunk_elements)
    merged = (split.evicted_valid & (similarity > sim_threshold)).float()
    log_weights = last_query_log_weights(x, keys)
    slot_weight = gather_positions(log_weights, keep).exp()
    evicted_weight = gather_positions(log_weights, split.evicted).exp() * merged
    return Matches(slot_keys, slot_values, evicted_keys, evicted_values, target, merged, slot_weight,
                   evicted_weight)


def check_similarity_threshold(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
        raise ValueError(f"sim_threshold={value!r} is invalid: it must be a cosine similarity in [-1, 1] "
                         f"(the SimCalKV authors use 0.0 and 0.8)")
