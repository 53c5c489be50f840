"""H2O — Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023, arXiv:2306.14048).

Score = attention accumulated over ALL prompt queries (causal column sums); keep the heavy hitters
plus the most recent `window_size` tokens. This is the prefill (one-shot) form used by KVCache-Factory.

Decode form (H2O as published; on with `max_cache_size`): every slot carries its accumulated attention
(the prompt's column sums at prefill, then + each decode query's attention, per KV head the mean over
its query-head group); at each step the cache keeps the last `window_size` slots (recent budget) and
the `max_cache_size - window_size` slots of highest accumulated attention (heavy budget): with one new
token per step, one eviction per step.

Ratio form (`heavy_ratio` + `recent_ratio`, H2O's heavy_ratio / recent_ratio and CaM's --start_ratio /
--recent_ratio): each row's budgets come from its own prompt length S (real tokens):
heavy = floor(heavy_ratio * S), recent = floor(recent_ratio * S), cache = heavy + recent, fixed at
prefill as in the released code (FMInference/H2O h2o_hf/utils_hh/modify_llama.py and CaM's, both
`int(ratio * prompt length)` at the first forward; here with a 1e-9 tolerance, so 0.29 * 100 is 29, not
int()'s 28). The prefill keeps at most heavy + recent tokens, then decoding holds each row there with one
eviction per step, exactly the count form with max_cache_size = heavy + recent, window_size = recent.
Unlike the count form either budget may be 0 (short prompts); when both round to 0 the recent budget
is 1, so a row always holds a token.
"""

import math
from dataclasses import dataclass

import torch

from .base import KVMethod, PrefillInputs, _row_budgets, group_mean, keep_top_prefix_and_window

RATIO_CONFLICTS = ("max_cache_size", "max_capacity_prompt", "compress_ratio", "keep_ratio")


@dataclass
class H2O(KVMethod):
    name = "H2O"
    has_decode_form = True
    # query rows per chunk are chosen so that one chunk's logits stay below this many elements
    chunk_elements: int = 1 << 25
    # ratio form: budgets as fractions of each row's prompt length (None/None = the count form)
    heavy_ratio: float | None = None
    recent_ratio: float | None = None

    def __post_init__(self):
        ratios = self.ratio_form
        if ratios:  # before the base fills in the default prompt budget (128), which would read as given
            self._check_ratio_form()
        super().__post_init__()
        if ratios:
            self.max_capacity_prompt = None  # the prefill budget is each row's heavy + recent
            return
        if self.max_cache_size is not None and self.max_cache_size <= self.window_size:
            raise ValueError(f"max_cache_size={self.max_cache_size} must be larger than window_size="
                             f"{self.window_size} (the recent budget is part of the cache)")

    @property
    def ratio_form(self) -> bool:
        return self.heavy_ratio is not None or self.recent_ratio is not None

    @property
    def decodes(self) -> bool:
        return super().decodes or self.ratio_form  # the ratio form is H2O's decode-time rule

    def _check_ratio_form(self) -> None:
        if not self.has_decode_form:
            raise ValueError(f"heavy_ratio / recent_ratio size H2O's decode-time cache; {self.name} has no decode "
                             f"form; valid choices: H2O, CaM")
        for name in ("heavy_ratio", "recent_ratio"):
            value = getattr(self, name)
            if value is None:
                other = "recent_ratio" if name == "heavy_ratio" else "heavy_ratio"
                raise ValueError(f"{other}={getattr(self, other)!r} given without {name}: the ratio form needs both "
                                 f"(e.g. heavy_ratio=0.1, recent_ratio=0.1)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name}={value!r} is invalid: it must be a fraction of the prompt length in (0, 1]")
        given = [f"{name}={getattr(self, name)!r}" for name in RATIO_CONFLICTS if getattr(self, name) is not None]
        if self.window_size != 8:  # the field's default; the ratio form's recent budget is recent_ratio's
            given.append(f"window_size={self.window_size!r}")
        if given:
            raise ValueError(f"heavy_ratio / recent_ratio and {', '.join(given)} both size the cache; give the ratios "
                             f"(budgets from each prompt's length) or the counts (max_cache_size, window_size), not both")

    def ratio_budgets(self, prompt_length: int) -> tuple[int, int]:
        """(heavy, recent) tokens for a row whose prompt has `prompt_length` real tokens (ratio form)."""
        heavy = math.floor(self.heavy_ratio * prompt_length + 1e-9)  # floor, as released (int()); 1e-9: float error
        recent = math.floor(self.recent_ratio * prompt_length + 1e-9)
        return heavy, max(recent, 1 - heavy)  # both 0 (a short prompt): keep the newest token

    def capacity(self, seq_len: int) -> int:
        if self.ratio_form:
            return sum(self.ratio_budgets(seq_len))
        return super().capacity(seq_len)

    def decode_budgets(self, real_counts, layer_idx, num_layers, prompt_lengths=None):
        if not self.ratio_form:
            return super().decode_budgets(real_counts, layer_idx, num_layers, prompt_lengths)
        if prompt_lengths is None or len(prompt_lengths) != len(real_counts):
            raise ValueError(f"{self.name} with heavy_ratio / recent_ratio needs each row's prompt length at decode "
                             f"(the cache records it at prefill); got {prompt_lengths!r}")
        return [min(self.capacity(s), n) for s, n in zip(prompt_lengths, real_counts)]

    def select(self, x, budget, full_scores=None):
        if not self.ratio_form:
            return super().select(x, budget, full_scores)
        # prefill of the ratio form: this prompt's real lengths are the rows' prompt lengths
        budgets, lengths = _row_budgets(budget, x), x.real_lengths()
        if all(b >= n for b, n in zip(budgets, lengths)) and max(lengths) == x.seq_len:
            return None
        scores = self.score(x, 0) if full_scores is None else full_scores
        recent = [self.ratio_budgets(n)[1] for n in lengths]
        return _keep_heavy_and_recent(self.selection_heads(scores.float(), x), budgets, recent, x.padding_mask)

    def decode_prefill_state(self, x, keep):
        sums = self.selection_heads(self.score(x, 0).float(), x)  # [B, stored heads, S]
        return {"accumulated": sums if keep is None else sums.gather(-1, keep)}

    def decode_observe(self, d):
        attention = d.attention.sum(dim=2)  # [B, Hq, P]: every new query's attention
        heads = d.keys.shape[1]
        if attention.shape[1] != heads:
            attention = group_mean(attention, attention.shape[1] // heads)
        accumulated = d.padded_state("accumulated")
        d.state["accumulated"] = attention if accumulated is None else accumulated + attention

    def decode_select(self, d, budgets):
        visible = None if not bool(d.hidden.any()) else ~d.hidden
        if self.ratio_form:
            recent = [self.ratio_budgets(s)[1] for s in d.prompt_lengths]
            return _keep_heavy_and_recent(d.state["accumulated"], budgets, recent, visible)
        window = min(self.window_size, *budgets)
        scores = d.state["accumulated"][..., : d.slots - window]
        return keep_top_prefix_and_window(scores, budgets, d.slots, visible)

    def score(self, x: PrefillInputs, window: int):
        """Column sums of the causal prompt attention, per query head [B, Hq, S - window] (fp32).

        Cost: the prompt's Q.K^T and softmax again (O(S^2 * D) per head), computed per chunk of query
        rows; a chunk [start, end) only reads the keys before `end` (causal), which halves the work,
        and GQA groups become extra query rows of one matmul per KV head (no repeated keys). At least 8
        chunks, so that skipping the keys after each chunk saves ~45% of the work. The sums are kept on
        `x` (per chunk size): a sweep that compresses one recorded prefill with several accumulated-
        attention methods (pyramidkv.shared_prefill) computes them once per layer."""
        memo = getattr(x, "_column_sums", {})
        if self.chunk_elements not in memo:
            memo[self.chunk_elements] = self._column_sums(x)
            x._column_sums = memo
        return memo[self.chunk_elements][..., : x.seq_len - window]  # per query head; the base groups them

    def _column_sums(self, x: PrefillInputs) -> torch.Tensor:
        seq_len = x.seq_len
        batch, heads, _, dim = x.query.shape
        kv_heads, groups = x.keys.shape[1], x.num_kv_groups
        keys = x.keys.float()
        rows = max(1, min(self.chunk_elements // (batch * heads * seq_len), -(-seq_len // 8)))
        totals = torch.zeros(batch, heads, seq_len, device=keys.device)
        real = None if x.padding_mask is None else x.padding_mask.bool()
        for start in range(0, seq_len, rows):
            end = min(seq_len, start + rows)
            q = x.query[:, :, start:end].float().reshape(batch, kv_heads, groups * (end - start), dim)
            logits = torch.matmul(q, keys[:, :, :end].transpose(2, 3)).view(batch, heads, end - start, end)
            logits.mul_(x.scaling)
            hidden = torch.arange(end, device=keys.device)[None, :] > torch.arange(start, end, device=keys.device)[:, None]
            hidden = hidden[None, None]
            if real is not None:
                hidden = hidden | ~real[:, None, None, :end] | ~real[:, None, start:end, None]
            probs = torch.softmax(logits.masked_fill_(hidden, float("-inf")), dim=-1)
            if real is not None:
                probs = torch.nan_to_num_(probs, nan=0.0)  # pad query rows are all-masked -> NaN
            totals[..., :end] += probs.sum(dim=2)
        return totals


def _keep_heavy_and_recent(scores, budgets, recent, padding_mask):
    """Per row b: its last recent[b] slots and the budgets[b] - recent[b] other slots of highest score
    (ties: the earliest), in slot order, laid out as keep_top_prefix_and_window lays them out. The
    recent slots are given score +inf, so that one top-k per row with its own window picks them all
    (the rows' recent budgets differ: keep_top_prefix_and_window's window is one for the batch)."""
    scores = scores.clone()
    slots = scores.shape[-1]
    for row, count in enumerate(recent):
        if count > 0:
            scores[row, :, slots - count:] = float("inf")  # a row's real tokens are its last slots
    return keep_top_prefix_and_window(scores, budgets, slots, padding_mask)
