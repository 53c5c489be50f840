"""Compression while decoding: what a method sees at a decode step, and the default decode rule.

A method with `max_cache_size` (or `compress_interval`) set also acts during decoding: after a layer's
attention for the new token(s), every `compress_interval` forwards, the cache asks the method which of
its stored slots to keep (:meth:`KVMethod.decode_select`) so that each layer / KV head holds at most
`max_cache_size` tokens (then at most max_cache_size + compress_interval - 1 between two evictions).
The method sees :class:`DecodeInputs`: the stored keys (this step's appended), the new queries, which
slots hold no token of a row, and a per-slot state it carries across steps (H2O's accumulated
attention), which the cache reorders with the slots on every eviction.

Eviction happens AFTER the step's attention (the new token's attention is what H2O and TOVA score
with), as CS3602's protocol compresses `past_key_values` after each forward: a step's attention spans
the kept max_cache_size tokens plus the new one.

Slot layout (the cache's batch contract): in row b the real tokens are its LAST slots in time order and
hidden slots (fillers, or pads of a row kept whole) come first, so `~hidden` reads as a left-padding
mask and the prefill selection rule (`KVMethod.select`) applies to the cache unchanged: that is the
decode form of every key-only method (StreamingLLM rolling, recent_only, L2Norm, CS3602's family with
prune_after), re-applying the prefill rule to the cache as CS3602 re-applies its compress functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .base import PrefillInputs


@dataclass
class DecodeInputs:
    """One layer's cache at a decode step, as the attention hook sees it right after attention."""

    query: torch.Tensor  # [B, Hq, q, D] this step's post-RoPE queries
    keys: torch.Tensor  # [B, H, P, D] stored keys (the step's own appended last), H = stored heads
    values: torch.Tensor  # [B, H, P, D]
    hidden: torch.Tensor  # [B, P] bool, True = the slot holds no token of that row (filler or pad)
    bias: torch.Tensor | None  # [B, H, P] fp32 additive logit bias of merged slots, None = 0
    layer_idx: int
    num_layers: int
    scaling: float
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # per-slot method state [B, H, P]
    step: int = 0  # decode forwards of this layer since prefill, this one included (seeds CaM's draws)
    prompt_lengths: list[int] | None = None  # each row's real prompt tokens (H2O's ratio budgets)

    @property
    def slots(self) -> int:
        return self.keys.shape[-2]

    def real_counts(self) -> list[int]:
        """Tokens each row holds in this layer."""
        return [int(n) for n in (~self.hidden).sum(-1).tolist()]

    def as_prefill(self) -> PrefillInputs:
        """The cache as a left-padded 'prompt' (hidden slots read as pads) for the prefill rule."""
        padding = None if not bool(self.hidden.any()) else ~self.hidden
        return PrefillInputs(self.query, self.keys, self.values, padding, self.layer_idx, self.num_layers,
                             self.scaling)

    @functools.cached_property
    def attention(self) -> torch.Tensor:
        """Softmax attention [B, Hq, q, P] (fp32) of the step's queries over the stored slots: hidden
        slots excluded, causal among the step's own tokens, merged slots' bias added."""
        batch, query_heads, q_len, dim = self.query.shape
        heads, slots = self.keys.shape[1], self.slots
        groups = query_heads // heads
        # query head h*groups + g reads stored head h: the group's queries are rows of one matmul
        query = self.query.float().reshape(batch, heads, groups * q_len, dim)
        logits = torch.matmul(query, self.keys.float().transpose(2, 3)).view(batch, query_heads, q_len, slots)
        logits.mul_(self.scaling)
        if self.bias is not None:
            logits += self.bias.repeat_interleave(groups, dim=1)[:, :, None, :]
        q_slot = torch.arange(slots - q_len, slots, device=logits.device)[:, None]
        future = torch.arange(slots, device=logits.device)[None, :] > q_slot
        logits.masked_fill_(future[None, None] | self.hidden[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)

    def padded_state(self, name: str) -> torch.Tensor | None:
        """State `name` extended with zeros for the slots appended since the last eviction."""
        state = self.state.get(name)
        if state is None or state.shape[-1] >= self.slots:
            return state
        return torch.nn.functional.pad(state, (0, self.slots - state.shape[-1]))
