"""The CS3602 kvcompress family (the course project "CS3602 LLM Inference Acceleration", its README in
../shared/seeds/002; github.com/od-liu/CS3602-LLM-Inference-Acceleration, kvcompress/methods/*), by its
registry names and parameters. All are key-only: tokens are ranked by their key's L2 norm (low = keep,
after KnormPress), so they also run on a finished cache (`pyramidkv.compress_cache`).

Every method keeps, per layer and head: the first `sinks` real tokens, the last `recent` ones, and the
best-ranked others up to its budget, in original order. They size the cache with their own parameters:
max_capacity_prompt, compress_ratio, window_size, kernel_size and pooling are not used (the first two
are refused). `skip_layers`: layer indices left whole (an int n = the first n layers).

- l2_compress(keep_ratio=1.0, prune_after=1000, skip_layers=(0, 1)): ceil(keep_ratio * n) lowest-norm
  tokens, only for prompts longer than prune_after; no sinks, no recent window.
- fix_size_l2(fix_kv_size=1024, keep_ratio=0.0, strategy, skip_layers=(0, 1)): fix_kv_size tokens, of
  which the last int(fix_kv_size * keep_ratio) are protected recent ones (keep_ratio = that SHARE here);
  strategy keep_low / keep_high (norm) / random (seeded by `seed`).
- h2o_l2(start_size=4, heavy_hitter_size=64, recent_size=444): sinks + lowest-norm heavy hitters + recent.
- snapkv_lite(observation_window=32, keep_size=512, pooling_kernel=5): the window + the prefix tokens of
  highest (max norm - norm), average-pooled (zero padding) when the prefix is at least a kernel long.
- pyramid_kv(base_size=512, layer_decay=0.9, min_size=64, profile): layer l keeps
  max(min_size, int(base_size * layer_decay**l)) (linear: base down to min_size; constant: base), as
  min(4, size // 8) sinks + size // 2 recent + lowest-norm middle (recent only when no middle is left).
- adaptive_l2(target_size=512, soft_limit=256, hard_limit=1024, keep_ratio_min=0.3, keep_ratio_max=0.9):
  n <= soft_limit: whole; n <= hard_limit: max(soft_limit, int(n * r)) tokens, r falling linearly from
  keep_ratio_max to keep_ratio_min, the last 20% of them recent; longer: target_size as 4 sinks +
  target_size // 2 recent + lowest-norm middle.
streaming_llm and recent_only equal StreamingLLM and are parameter aliases of it (methods/__init__.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (KVMethod, PrefillInputs, _check_positive_int, _row_budgets, keep_top_prefix_and_window,
                   layer_indices, pool_votes)

STRATEGIES = ("keep_low", "keep_high", "random")
PROFILES = ("exponential", "linear", "constant")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {minimum}")


def _check_fraction(name: str, value, low: float, high: float, closed_high: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value and (
        value <= high if closed_high else value < high)
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: it must lie in [{low:g}, {high:g}{']' if closed_high else ')'}")


@dataclass
class KeyNormLayout(KVMethod):
    """Sinks + best-ranked middle + recent, ranked by key norm; subclasses give sizes and the ranking."""

    name: ClassVar[str] = "key_norm_layout"
    needs_queries: ClassVar[bool] = False
    has_decode_form: ClassVar[bool] = True  # prefill rule re-applied to the cache (methods/decode.py)
    sizes_own_cache: ClassVar[bool] = True
    takes_keep_ratio: ClassVar[bool] = False  # l2_compress / fix_size_l2 have their own keep_ratio
    skip_layers: int | Sequence[int] = ()

    def _check_budget(self) -> None:
        refused = ("max_capacity_prompt", "compress_ratio") + (() if self.takes_keep_ratio else ("keep_ratio",))
        for field in refused:
            if getattr(self, field) is not None:
                raise ValueError(f"{field}={getattr(self, field)!r} is not used by {self.name}, which sizes its "
                                 f"cache with its own parameters ({self.size_parameters})")
        self.skip_layers = layer_indices("skip_layers", self.skip_layers)

    size_parameters: ClassVar[str] = ""

    def size(self, seq_len: int, layer: int, num_layers: int) -> int:
        raise NotImplementedError

    def protected(self, kept: int, seq_len: int) -> tuple[int, int]:
        """(sinks, recent) of a row keeping `kept` of its `seq_len` tokens."""
        return 0, 0

    def ranking(self, x: PrefillInputs, keys: torch.Tensor) -> torch.Tensor:
        """[B, H, S] higher = keep (default: low key norm)."""
        return -keys.float().norm(dim=-1)

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        return [seq_len if layer in self.skip_layers else min(seq_len, self.size(seq_len, layer, num_layers))
                for layer in range(num_layers)]

    def select(self, x, budget, full_scores=None):
        row_budgets = _row_budgets(budget, x)
        lengths = x.real_lengths()
        if all(b >= n for b, n in zip(row_budgets, lengths)) and max(lengths) == x.seq_len:
            return None
        keys = self.stored_states(x)[0]
        scores = self.ranking(x, keys).clone()
        position = torch.arange(x.seq_len, device=scores.device)
        for row, (kept, length) in enumerate(zip(row_budgets, lengths)):
            if kept >= length:
                continue
            sinks, recent = self.protected(kept, length)
            first = x.seq_len - length
            forced = ((position >= first) & (position < first + sinks)) | (position >= x.seq_len - recent)
            scores[row, :, forced] = float("inf")
        # window 0: the whole prompt is ranked; sinks and recent tokens are forced by their score
        return keep_top_prefix_and_window(scores, row_budgets, x.seq_len, x.padding_mask)


@dataclass
class L2Compress(KeyNormLayout):
    name: ClassVar[str] = "l2_compress"
    takes_keep_ratio: ClassVar[bool] = True
    size_parameters: ClassVar[str] = "keep_ratio, prune_after"
    keep_ratio: float | None = 1.0
    prune_after: int = 1000
    skip_layers: int | Sequence[int] = (0, 1)

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("keep_ratio", self.keep_ratio, 0, 1, closed_high=True)
        if self.keep_ratio == 0:
            raise ValueError("keep_ratio=0 is invalid: it must lie in (0, 1]")
        _check_int("prune_after", self.prune_after, 0)

    def size(self, seq_len, layer, num_layers):
        if seq_len <= self.prune_after:
            return seq_len
        return math.ceil(self.keep_ratio * seq_len - 1e-9)


@dataclass
class FixSizeL2(KeyNormLayout):
    name: ClassVar[str] = "fix_size_l2"
    takes_keep_ratio: ClassVar[bool] = True
    size_parameters: ClassVar[str] = "fix_kv_size, keep_ratio = protected recent share"
    fix_kv_size: int = 1024
    keep_ratio: float | None = 0.0
    strategy: str = "keep_low"
    skip_layers: int | Sequence[int] = (0, 1)
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.fix_kv_size, bool) or not isinstance(self.fix_kv_size, int) or self.fix_kv_size <= 0:
            raise ValueError(f"fix_kv_size={self.fix_kv_size!r} is invalid: it must be a positive integer (tokens kept)")
        _check_fraction("keep_ratio", self.keep_ratio, 0, 1, closed_high=False)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; valid choices: {', '.join(STRATEGIES)}")

    def size(self, seq_len, layer, num_layers):
        return self.fix_kv_size

    def protected(self, kept, seq_len):
        return 0, min(int(self.fix_kv_size * self.keep_ratio), kept)

    def ranking(self, x, keys):
        if self.strategy == "keep_low":
            return -keys.float().norm(dim=-1)
        if self.strategy == "keep_high":
            return keys.float().norm(dim=-1)
        # random: seeded per layer, positioned from each row's first real token (a padded row draws
        # what its single run draws)
        draws = keys.new_zeros(keys.shape[:3], dtype=torch.float32)
        generator = torch.Generator(device=keys.device)
        for row, length in enumerate(x.real_lengths()):
            generator.manual_seed(self.seed * 1_000_003 + x.layer_idx)
            draws[row, :, x.seq_len - length:] = torch.rand(keys.shape[1], length, generator=generator,
                                                            device=keys.device)
        return draws


@dataclass
class H2OL2(KeyNormLayout):
    name: ClassVar[str] = "h2o_l2"
    size_parameters: ClassVar[str] = "start_size + heavy_hitter_size + recent_size"
    start_size: int = 4
    heavy_hitter_size: int = 64
    recent_size: int = 444

    def __post_init__(self):
        super().__post_init__()
        for field in ("start_size", "heavy_hitter_size", "recent_size"):
            _check_int(field, getattr(self, field), 0)
        _check_positive_int("start_size + heavy_hitter_size + recent_size",
                            self.start_size + self.heavy_hitter_size + self.recent_size)

    def size(self, seq_len, layer, num_layers):
        return self.start_size + self.heavy_hitter_size + self.recent_size

    def protected(self, kept, seq_len):
        return self.start_size, self.recent_size


@dataclass
class SnapKVLite(KeyNormLayout):
    name: ClassVar[str] = "snapkv_lite"
    size_parameters: ClassVar[str] = "keep_size, observation_window"
    observation_window: int = 32
    keep_size: int = 512
    pooling_kernel: int = 5

    def __post_init__(self):
        super().__post_init__()
        for field in ("observation_window", "keep_size", "pooling_kernel"):
            _check_int(field, getattr(self, field), 1)
        if self.keep_size < self.observation_window:
            raise ValueError(f"keep_size={self.keep_size} must be at least observation_window="
                             f"{self.observation_window} (the window is always kept)")

    def size(self, seq_len, layer, num_layers):
        return self.keep_size

    def protected(self, kept, seq_len):
        return 0, self.observation_window

    def ranking(self, x, keys):
        norms = keys.float().norm(dim=-1)
        prefix = max(0, x.seq_len - self.observation_window)
        real = torch.ones(norms.shape[0], x.seq_len, dtype=torch.bool, device=norms.device)
        if x.padding_mask is not None:
            real = x.padding_mask.bool()
        real = real[:, None, :prefix]
        top = norms[..., :prefix].masked_fill(~real, float("-inf")).amax(dim=-1, keepdim=True)
        importance = ((top + 1e-6) - norms[..., :prefix]).masked_fill(~real, 0.0)  # pads pool as zero padding
        pooled = pool_votes(importance, self.pooling_kernel, "avgpool")
        long_enough = torch.tensor([n - self.observation_window >= self.pooling_kernel for n in x.real_lengths()],
                                   device=norms.device)[:, None, None]
        scores = norms.clone()
        scores[..., :prefix] = torch.where(long_enough, pooled, importance)
        return scores  # window columns are forced by `protected`


@dataclass
class PyramidKVLite(KeyNormLayout):
    name: ClassVar[str] = "pyramid_kv"
    size_parameters: ClassVar[str] = "base_size, layer_decay, min_size, profile"
    base_size: int = 512
    layer_decay: float = 0.9
    min_size: int = 64
    profile: str = "exponential"

    def __post_init__(self):
        super().__post_init__()
        _check_int("base_size", self.base_size, 1)
        _check_int("min_size", self.min_size, 1)
        _check_fraction("layer_decay", self.layer_decay, 0, 1, closed_high=True)
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r} is unknown; valid choices: {', '.join(PROFILES)}")

    def size(self, seq_len, layer, num_layers):
        if self.profile == "exponential":
            size = int(self.base_size * self.layer_decay ** layer)
        elif self.profile == "linear":
            size = int(self.base_size - layer * (self.base_size - self.min_size) / max(num_layers - 1, 1))
        else:
            size = self.base_size
        return max(size, self.min_size)

    def protected(self, kept, seq_len):
        sinks, recent = min(4, kept // 8), kept // 2
        return (0, kept) if kept - sinks - recent <= 0 else (sinks, recent)


@dataclass
class AdaptiveL2(KeyNormLayout):
    name: ClassVar[str] = "adaptive_l2"
    size_parameters: ClassVar[str] = "target_size, soft_limit, hard_limit, keep_ratio_min, keep_ratio_max"
    target_size: int = 512
    soft_limit: int = 256
    hard_limit: int = 1024
    keep_ratio_min: float = 0.3
    keep_ratio_max: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        for field in ("target_size", "soft_limit", "hard_limit"):
            _check_int(field, getattr(self, field), 1)
        if not self.soft_limit < self.hard_limit:
            raise ValueError(f"soft_limit={self.soft_limit} must be below hard_limit={self.hard_limit}")
        for field in ("keep_ratio_min", "keep_ratio_max"):
            _check_fraction(field, getattr(self, field), 0, 1, closed_high=True)

    def size(self, seq_len, layer, num_layers):
        if seq_len <= self.soft_limit:
            return seq_len
        if seq_len > self.hard_limit:
            return min(seq_len, self.target_size)
        progress = (seq_len - self.soft_limit) / (self.hard_limit - self.soft_limit)
        ratio = self.keep_ratio_max - progress * (self.keep_ratio_max - self.keep_ratio_min)
        return max(int(seq_len * ratio), self.soft_limit)

    def protected(self, kept, seq_len):
        if seq_len > self.hard_limit:
            sinks, recent = 4, kept // 2
            return (0, kept) if kept - sinks - recent <= 0 else (sinks, recent)
        recent = int(kept * 0.2)
        return (0, kept) if kept - recent <= 0 else (0, recent)


CS3602_METHODS = (L2Compress, FixSizeL2, H2OL2, SnapKVLite, PyramidKVLite, AdaptiveL2)
