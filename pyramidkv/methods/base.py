"""What every compression method shares: its config, validation, and the keep-top-k-plus-window rule (its
helpers: selection.py).

A method sees one layer's prefill through :class:`PrefillInputs` and returns, per head, the indices of
the prompt tokens to keep (:meth:`KVMethod.select`). Scorer methods only implement :meth:`score`; the
base class handles budgets (one per row of a batch), the observation window, left padding and GQA.

Budgets: exactly one of `max_capacity_prompt` (tokens per layer and head), `compress_ratio` (fraction
of each row's real tokens removed, SimCalKV's `--compress_ratio`) or `keep_ratio` (fraction kept,
CS3602's); a ratio is resolved per row from that row's real length (:meth:`KVMethod.capacity`).
Merging methods return a third tensor from :meth:`KVMethod.compress`: an additive logit bias per
stored slot (see CompressedLayer.slot_bias).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

# the selection helpers live in selection.py; imported here for the base rule and re-exported for methods
from .selection import (gather_tokens, group_mean, keep_top_prefix_and_window, pool_votes,  # noqa: F401
                        repeat_kv, window_attention)

POOLINGS = ("avgpool", "maxpool")
# "kv_head": scores averaged over each query-head group, one selection per KV head, the cache stores
# the KV heads; "query_head": K/V repeated to the query heads, one selection per query head, the cache
# stores num_attention_heads heads (KVCache-Factory's default, and its memory)
GQA_SELECTIONS = ("kv_head", "query_head")
DEFAULT_CAPACITY = 128  # max_capacity_prompt when no budget is given
BUDGET_FIELDS = ("max_capacity_prompt", "compress_ratio", "keep_ratio")


@dataclass
class PrefillInputs:
    """One layer's prefill, as the attention hook sees it (all post-RoPE)."""

    query: torch.Tensor  # [B, Hq, S, D]
    keys: torch.Tensor  # [B, Hkv, S, D]
    values: torch.Tensor  # [B, Hkv, S, D]
    padding_mask: torch.Tensor | None  # [B, S] bool, True = real token (left padding); None = no padding
    layer_idx: int
    num_layers: int
    scaling: float

    @property
    def seq_len(self) -> int:
        return self.keys.shape[-2]

    @property
    def num_kv_groups(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]

    def real_lengths(self) -> list[int]:
        """Real (non-pad) tokens of each row."""
        if self.padding_mask is None:
            return [self.seq_len] * self.keys.shape[0]
        return [int(n) for n in self.padding_mask.sum(-1).tolist()]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")


@dataclass
class KVMethod:
    """Base config shared by all methods.

    max_capacity_prompt: tokens kept per layer and head after prefill, observation window included
        (default 128 when neither ratio is given).
    compress_ratio / keep_ratio: the budget as a fraction of each row's real tokens, removed / kept
        (one of the three budgets only; a ratio lies strictly between 0 and 1).
    window_size: the last `window_size` prompt tokens are always kept and (for attention-based scorers)
        are the observation window whose queries vote for the prefix.
    kernel_size / pooling: 1-D pooling of the votes (SnapKV's clustering step); the kernel is odd so
        that it is centred on the token it scores.
    gqa_selection: "kv_head" or "query_head" (see GQA_SELECTIONS).
    """

    name: ClassVar[str] = "base"
    # False for key-only methods, which can also compress a finished cache (pyramidkv.compress_cache)
    needs_queries: ClassVar[bool] = True
    # True for methods sized by their own parameters (CS3602's), not by a budget or ratio
    sizes_own_cache: ClassVar[bool] = False
    max_capacity_prompt: int | None = None
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "maxpool"
    gqa_selection: str = "kv_head"
    compress_ratio: float | None = None
    keep_ratio: float | None = None
    # compression while decoding (methods/decode.py): None/None = prefill only
    max_cache_size: int | None = None  # tokens each layer / KV head holds at most while decoding
    compress_interval: int | None = None  # act every this many decode forwards (default 1 when on)
    # what each kept entry costs (pyramidkv/quant.py): "none" or "kivi" (nbits-bit codes, KIVI's layout)
    quant_method: str = "none"
    nbits: int = 4
    group_size: int = 32
    residual_length: int = 32  # latest tokens kept in full precision (at least window_size)
    pos_shift: bool = False  # positions by cache slot instead of true positions (pyramidkv/pos_shift.py)
    # prompt tokens per prefill chunk, compressed back to the budget after each (pyramidkv/chunked_prefill.py)
    prefill_chunk_size: int | None = None

    # True for a method with a decode-time rule (key-only ones: their prefill rule re-applied)
    has_decode_form: ClassVar[bool] = False

    def __post_init__(self):
        self._check_budget()
        self._check_decode()
        from ..quant import check_quant_config  # late: quant imports the cache, which imports the methods
        check_quant_config(self)
        if self.pos_shift:
            from ..pos_shift import check_method  # late: pos_shift reads the method classes

            check_method(self)
        for field in ("window_size", "kernel_size"):
            _check_positive_int(field, getattr(self, field))
        if self.prefill_chunk_size is not None:
            from ..chunked_prefill import check_method as check_chunking

            check_chunking(self)
        if self.max_capacity_prompt is not None and self.max_capacity_prompt <= self.window_size:
            raise ValueError(
                f"max_capacity_prompt={self.max_capacity_prompt} must be larger than "
                f"window_size={self.window_size} (the budget includes the observation window)"
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size={self.kernel_size} is invalid: it must be odd (an even kernel pools "
                f"unevenly around each token), e.g. {self.kernel_size - 1} or {self.kernel_size + 1}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is unknown; valid choices: {', '.join(POOLINGS)}")
        if self.gqa_selection not in GQA_SELECTIONS:
            raise ValueError(
                f"gqa_selection={self.gqa_selection!r} is unknown; valid choices: {', '.join(GQA_SELECTIONS)}"
            )

    def _check_budget(self) -> None:
        """Exactly one budget; a ratio strictly inside (0, 1); max_capacity_prompt 128 when none is given."""
        given = [field for field in BUDGET_FIELDS if getattr(self, field) is not None]
        if len(given) > 1:
            values = ", ".join(f"{field}={getattr(self, field)!r}" for field in given)
            raise ValueError(f"{values}: give one budget only; choices: max_capacity_prompt (tokens), "
                             f"compress_ratio (fraction removed) or keep_ratio (fraction kept)")
        for field in ("compress_ratio", "keep_ratio"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < 1):
                raise ValueError(f"{field}={value!r} is invalid: it must be a fraction strictly between 0 and 1")
        if not given:
            self.max_capacity_prompt = DEFAULT_CAPACITY
        if self.max_capacity_prompt is not None:
            _check_positive_int("max_capacity_prompt", self.max_capacity_prompt)

    def _check_decode(self) -> None:
        for field in ("max_cache_size", "compress_interval"):
            if getattr(self, field) is not None:
                _check_positive_int(field, getattr(self, field))
        if self.decodes and not self.has_decode_form:
            from . import decode_methods  # late: the registry imports this module
            raise ValueError(f"{self.name} has no decode-time form, so max_cache_size / compress_interval cannot "
                             f"be used with it; valid choices: {', '.join(decode_methods())}")

    @property
    def decodes(self) -> bool:
        """True when the method also compresses while decoding."""
        return self.max_cache_size is not None or self.compress_interval is not None

    def decode_budgets(self, real_counts: Sequence[int], layer_idx: int, num_layers: int,
                       prompt_lengths: Sequence[int] | None = None) -> list[int]:
        """Tokens each row keeps in a layer at a decode eviction: max_cache_size for a budgeted method
        (its prefill budget otherwise), the method's own size for self-sized ones, capped by
        max_cache_size. `prompt_lengths`: each row's real prompt tokens (H2O's ratio form sizes by them)."""
        cap = self.max_cache_size
        budgets = []
        for n in real_counts:
            if cap is not None and not self.sizes_own_cache:
                budget = cap
            else:
                budget = self.layer_budgets(n, num_layers)[layer_idx]
                budget = budget if cap is None else min(budget, cap)
            budgets.append(min(budget, n))
        return budgets

    def decode_prefill_state(self, x: PrefillInputs, keep: torch.Tensor | None) -> dict:
        """Per-slot state [B, H, kept slots] carried into decoding (H2O: the prompt's accumulated
        attention of each kept token); `keep`: the kept positions, None = the whole prompt."""
        return {}

    def decode_observe(self, d) -> None:
        """Called at every decode step of a layer (before any eviction): update `d.state` in place."""

    def decode_select(self, d, budgets: list[int]) -> torch.Tensor | None:
        """Slots [B, H, K] to keep at a decode eviction (row b's kept slots its last min(budget_b, real_b),
        ascending), None = all. Key-only methods: the prefill rule applied to the cache."""
        return self.select(d.as_prefill(), budgets)

    @property
    def uses_logit_bias(self) -> bool:
        """True for a method whose slots carry an additive logit bias (eager/sdpa only)."""
        return False

    def capacity(self, seq_len: int) -> int:
        """Tokens a row of `seq_len` real tokens keeps per layer before any layer schedule: the token
        budget, or the ratio of its length (SimCalKV: ceil((1 - compress_ratio) * n) = n - floor(r n);
        at least 1)."""
        if self.max_capacity_prompt is not None:
            return self.max_capacity_prompt
        kept = self.keep_ratio if self.keep_ratio is not None else 1 - self.compress_ratio
        return max(1, math.ceil(kept * seq_len - 1e-9))  # 1e-9: (1 - 0.4) * 10 is 6, not 6.000...1

    # ---- what subclasses override -------------------------------------------------------------
    def new_layer(self, layer_idx: int, num_layers: int):
        """The storage of one cache layer (DESIGN §6): dense K/V here; a storage option or a method
        with its own layout (quantized, per-head, latent) returns its CompressedLayer subclass."""
        from ..cache import CompressedLayer  # late: the cache imports the methods
        from ..quant import quantized_layer_for

        return quantized_layer_for(self) or CompressedLayer()

    def prepare_model(self, model) -> None:
        """Called by the patched forward before every forward of `model` (the base model, e.g.
        LlamaModel): a method that needs the model's weights or changes its projections sets them up
        here, idempotently. Nothing by default."""

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        """Tokens kept per layer (window included) for a prompt of `seq_len` real tokens; uniform by
        default. In a batch this is called once per row, with that row's real length."""
        return [min(self.capacity(seq_len), seq_len)] * num_layers

    def score(self, x: PrefillInputs, window: int) -> torch.Tensor:
        """Scores of the prefix tokens, [B, Hq or Hkv, S - window]; higher = keep. Per-query-head
        scores are averaged over each group for kv_head selection; per-KV-head scores are shared by
        the group's query heads for query_head selection."""
        raise NotImplementedError

    # ---- shared machinery ---------------------------------------------------------------------
    def config(self) -> dict:
        return dataclasses.asdict(self)

    def selection_heads(self, scores: torch.Tensor, x: PrefillInputs) -> torch.Tensor:
        """Scores -> one row per head that is selected and stored (see gqa_selection)."""
        groups = x.num_kv_groups
        if groups == 1:
            return scores
        if self.gqa_selection == "kv_head" and scores.shape[1] == x.query.shape[1]:
            return group_mean(scores, groups)
        if self.gqa_selection == "query_head" and scores.shape[1] == x.keys.shape[1]:
            return scores.repeat_interleave(groups, dim=1)
        return scores

    def stored_states(self, x: PrefillInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V heads the cache stores: the KV heads, or repeated to the query heads."""
        if self.gqa_selection == "query_head":
            return repeat_kv(x.keys, x.num_kv_groups), repeat_kv(x.values, x.num_kv_groups)
        return x.keys, x.values

    def select(self, x: PrefillInputs, budget: int | Sequence[int], full_scores: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        """Indices [B, H, K] of the tokens to keep (H: stored heads), None = keep everything.

        `budget`: one int, or one per row. A row keeps min(budget, real length) tokens, ascending, in
        its LAST slots; K is the largest row's count and a row below it fills its first slots with
        positions the cache hides (see keep_top_prefix_and_window and CompressedCache).
        `full_scores`: scores of ALL tokens [B, Hq or Hkv, S] already computed by the caller (merging
        methods reuse them); None = call :meth:`score`."""
        row_budgets = _row_budgets(budget, x)
        lengths = x.real_lengths()
        if all(b >= n for b, n in zip(row_budgets, lengths)) and max(lengths) == x.seq_len:
            return None  # every row kept whole and no slot to fill
        compressed = [b for b, n in zip(row_budgets, lengths) if b < n]
        window = min(self.window_size, *compressed) if compressed else min(self.window_size, x.seq_len)
        if compressed:
            scores = self.score(x, window) if full_scores is None else full_scores[..., : x.seq_len - window]
            prefix_scores = self.selection_heads(scores.float(), x)
        else:  # every row is kept whole: no scores needed, only the layout
            heads = self.stored_states(x)[0].shape[1]
            prefix_scores = x.keys.new_zeros(x.keys.shape[0], heads, x.seq_len - window, dtype=torch.float32)
        return keep_top_prefix_and_window(prefix_scores, row_budgets, x.seq_len, x.padding_mask)

    def compress(self, x: PrefillInputs, budget: int | Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The K/V to store for this layer (row b's kept tokens in its last min(budget_b, length_b)
        slots). Merging methods override this and may return a third tensor: the slots' additive logit
        bias [B, stored heads, K] (None or absent = no bias)."""
        keys, values = self.stored_states(x)
        keep = self.select(x, budget)
        x.kept_indices = keep  # for decode_prefill_state (decoding methods carry per-slot state)
        if keep is None:
            return keys, values
        return gather_tokens(keys, keep), gather_tokens(values, keep)


def _row_budgets(budget: int | Sequence[int], x: PrefillInputs) -> list[int]:
    """Per-row budget, capped at the padded length."""
    rows = x.keys.shape[0]
    budgets = [budget] * rows if isinstance(budget, int) else [int(b) for b in budget]
    if len(budgets) != rows:
        raise ValueError(f"{len(budgets)} budgets for a batch of {rows} rows; give one int or one per row")
    return [min(b, x.seq_len) for b in budgets]


def layer_indices(name: str, value) -> tuple[int, ...]:
    """Layers named by a count n (the first n) or by indices (CS3602's skip_layers=[0, 1])."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return tuple(range(value))
    if isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return tuple(value)
    raise ValueError(f"{name}={value!r} is invalid: give layer indices (e.g. [0, 1]) or a count of first layers")


def check_finite_number(name: str, value, minimum: float) -> None:
    """One-line ValueError unless `value` is a real, finite number >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: it must be a finite number >= {minimum:g}")
