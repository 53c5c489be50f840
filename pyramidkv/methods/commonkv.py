"""CommonKV — Wang et al. 2025, "CommonKV: Compressing KV Cache with Cross-layer Parameter Sharing"
(arXiv:2508.16134): each layer caches a low-rank latent z = A h (A shared by a group of layer_step
adjacent layers, from an SVD of their stacked K/V projection weights) instead of K and V; K/V are
rebuilt from z at attention time. Storage and hooks: pyramidkv/commonkv.py.

layer_step: layers per group (the last group holds the remainder). rank: latent rank per layer
(None = the group's full rank, exact up to fp error); rank_file: JSON list of one rank per layer.
factorization: "weights" (default: SVD of the stacked weights) or "whitened" (SVD-LLM-style, minimises
the K/V error on the attention inputs of calibration_tokens tokens of calibration_file, None = the
bundled data/ppl/lear.txt; pyramidkv/commonkv_factors.py). The calibration fields are unused with "weights".
merge=True: cross-layer merge after prefill (pyramidkv/commonkv_merge.py; per batch row, on the row's
real tokens), no_merge_ratio of the (group, position) pairs stay per layer, first 4 / last 128 positions
never merged.
evict_method (e.g. "SnapKV", budgets max_capacity_prompt / compress_ratio / keep_ratio, window_size,
kernel_size, pooling as for that method; its other parameters at their defaults): after each layer's
prefill attention the eviction method scores the prompt from the rebuilt post-RoPE K and the window's
queries (its own score / select machinery); the latent is shared by the layer's KV heads, so the
selection is one per layer: the method's per-KV-head scores (GQA groups averaged, as kv_head selection)
summed over the KV heads. The layer then keeps only those positions' latents and positions.
With merge=True: evict first, then merge (after the last layer's eviction); a group's merge candidates
are the positions every layer of the group kept.
quant_method="kivi" (nbits 2/4/8, group_size tokens per group, residual_length): the kept latents
stored KIVI-quantized per latent channel in token groups, the latest tokens in full precision
(pyramidkv/commonkv_quant.py; nbytes() is its packed formula). Combines with evict_method.
Not yet supported (one-line errors): merge=True with quant_method (merged latents are not quantized),
gqa_selection="query_head" with evict_method (latents are per layer, not per head), beam search and
other batch-row reshuffles (LatentLayer.reorder_cache).
The KV bytes are nbytes() = sum over layers of tokens x rank x element size (FullKV: tokens x 2 x
kv_heads x head_dim x element size).
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

from .base import KVMethod


@dataclass
class CommonKV(KVMethod):
    name = "CommonKV"
    needs_queries = False
    layer_step: int = 4
    rank: int | None = None
    rank_file: str | None = None
    no_merge_ratio: float = 0.4
    merge: bool = False
    evict_method: str | None = None
    merge_weights: list | None = None  # per layer of a group (the released per-layer weight list); None = uniform
    factorization: str = "weights"  # "weights" (the paper's weight SVD) or "whitened" (activation-aware)
    calibration_file: str | None = None  # "whitened": its text; None = the bundled data/ppl/lear.txt
    calibration_tokens: int = 512  # "whitened": the first tokens of calibration_file run through the model

    def __post_init__(self):
        super().__post_init__()
        # the runners' flag for layer_step is typed int | float (another method's layer_step is a float)
        if isinstance(self.layer_step, float) and self.layer_step.is_integer():
            self.layer_step = int(self.layer_step)
        if isinstance(self.layer_step, bool) or not isinstance(self.layer_step, int) or self.layer_step < 1:
            raise ValueError(f"layer_step={self.layer_step!r} is invalid: it must be a positive integer")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank={self.rank!r} is invalid: it must be a positive integer or None (full rank)")
        from ..methods.base import check_finite_number

        check_finite_number("no_merge_ratio", self.no_merge_ratio, 0)
        if self.no_merge_ratio > 1:
            raise ValueError(f"no_merge_ratio={self.no_merge_ratio!r} is invalid: it must be a fraction in [0, 1]")
        if self.merge_weights is not None and len(self.merge_weights) != self.layer_step:
            raise ValueError(f"merge_weights={self.merge_weights!r} is invalid: give one weight per layer of a group "
                             f"(layer_step={self.layer_step})")
        from ..commonkv_factors import check_calibration

        check_calibration(self)
        self._evictor = None if self.evict_method is None else _build_evictor(self)
        if self.quant_method != "none" and self.merge:
            raise ValueError(f"CommonKV merge=True with quant_method={self.quant_method!r} is not supported (merged "
                             f"latents are stored in full precision); valid choices: merge=False, or quant_method='none'")
        self._model = self._factors = self._cache_layers = None
        self.num_layers = 0
        self._device_factors = {}

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        if self._evictor is not None:
            return self._evictor.layer_budgets(seq_len, num_layers)  # its schedule (PyramidKV's pyramid)
        return [seq_len] * num_layers

    def compress(self, x, budget):
        """evict_method: after layer x.layer_idx's prefill attention, keep the positions the eviction
        method selects (one selection per layer, see the module docstring) in the latent layer."""
        keep = self._evictor.select(x, budget)  # [B, heads, K], every head the same, or None = all
        self.cache_layers()[x.layer_idx].keep_slots(None if keep is None else keep[:, 0])
        return None, None  # LatentLayer.store_compressed only does the bookkeeping

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def new_layer(self, layer_idx: int, num_layers: int):
        from ..commonkv import LatentLayer  # late: commonkv imports the cache

        self.num_layers = num_layers
        if self.quant_method == "kivi":
            from ..commonkv_quant import QuantLatentLayer

            return QuantLatentLayer(self, layer_idx)
        return LatentLayer(self, layer_idx)

    def cache_layers(self):
        from ..cache import ACTIVE_CACHE

        return ACTIVE_CACHE.get().layers

    def prepare_model(self, model) -> None:
        from .. import commonkv

        if self._model is not model:
            self._factors = commonkv.compute_factors(model, self)
            if self.quant_method == "kivi":
                from ..commonkv_quant import check_ranks

                check_ranks(self._factors["ranks"], self.nbits)
            self._model, self._device_factors = model, {}
        commonkv.install_hooks(model)

    def device_factors(self, layer_idx: int, like) -> dict:
        key = (layer_idx, like.device, like.dtype)
        if key not in self._device_factors:
            self._device_factors[key] = {name: self._factors[name][layer_idx].to(like.device, like.dtype)
                                         for name in ("A", "Uk", "Uv")}
        return self._device_factors[key]

    def rotary(self, x, positions):
        return self._model.rotary_emb(x, positions)

    def current_padding_mask(self):
        from ..cache import ACTIVE_CACHE

        cache = ACTIVE_CACHE.get()
        return None if cache is None else cache.padding_mask


def evict_choices() -> list[str]:
    """Methods usable as CommonKV's evict_method: scorers that keep whole tokens in dense storage (no
    merging, per-head budgets or own layout: those cannot map onto one latent per position)."""
    from . import METHODS
    from .h2o import H2O

    # H2O's select is the base one outside its ratio form, which an evictor built here never has
    return [name for name, cls in METHODS.items() if cls.score is not KVMethod.score
            and cls.compress is KVMethod.compress and cls.select in (KVMethod.select, H2O.select)
            and cls.new_layer is KVMethod.new_layer]


def _heads_summed(self, scores, x):
    # one selection per layer: the kv_head scores of every KV head, summed per position
    return KVMethod.selection_heads(self, scores, x).sum(dim=1, keepdim=True)


def _build_evictor(method: CommonKV) -> KVMethod:
    from . import METHODS, canonical_name

    choices = evict_choices()
    try:
        name = canonical_name(method.evict_method)
    except ValueError:
        name = None
    if name not in choices:
        raise ValueError(f"CommonKV evict_method={method.evict_method!r} is invalid; valid choices: {', '.join(choices)}")
    if method.gqa_selection != "kv_head":
        raise ValueError(f"CommonKV with evict_method selects per layer (latents are shared by the heads), so "
                         f"gqa_selection={method.gqa_selection!r} is invalid; valid choices: kv_head")
    fields = ("max_capacity_prompt", "compress_ratio", "keep_ratio", "window_size", "kernel_size", "pooling")
    evictor = METHODS[name](**{field: getattr(method, field) for field in fields})
    evictor.selection_heads = types.MethodType(_heads_summed, evictor)
    return evictor
