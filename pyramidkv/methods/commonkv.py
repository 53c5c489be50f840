"""CommonKV — Wang et al. 2025, "CommonKV: Compressing KV Cache with Cross-layer Parameter Sharing"
(arXiv:2508.16134): each layer caches a low-rank latent z = A h (A shared by a group of layer_step
adjacent layers, from an SVD of their stacked K/V projection weights) instead of K and V; K/V are
rebuilt from z at attention time. Storage and hooks: pyramidkv/commonkv.py.

layer_step: layers per group (the last group holds the remainder). rank: latent rank per layer
(None = the group's full rank, exact up to fp error); rank_file: JSON list of one rank per layer.
Not yet supported (one-line errors): merge=True (cross-layer merge), evict_method, quant_method.
The KV bytes are nbytes() = sum over layers of tokens x rank x element size (FullKV: tokens x 2 x
kv_heads x head_dim x element size).
"""

from __future__ import annotations

import dataclasses
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

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.layer_step, bool) or not isinstance(self.layer_step, int) or self.layer_step < 1:
            raise ValueError(f"layer_step={self.layer_step!r} is invalid: it must be a positive integer")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank={self.rank!r} is invalid: it must be a positive integer or None (full rank)")
        if self.merge:
            raise ValueError("CommonKV with merge=True not supported yet; valid choices: merge=False")
        if self.evict_method is not None:
            raise ValueError(f"CommonKV with evict_method={self.evict_method!r} not supported yet; valid choices: None")
        if self.quant_method != "none":
            raise ValueError(f"CommonKV with quant_method={self.quant_method!r} not supported yet; valid choices: none")
        self._model = self._factors = None
        self._device_factors = {}

    def layer_budgets(self, seq_len: int, num_layers: int) -> list[int]:
        return [seq_len] * num_layers

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def new_layer(self, layer_idx: int, num_layers: int):
        from ..commonkv import LatentLayer  # late: commonkv imports the cache

        return LatentLayer(self, layer_idx)

    def prepare_model(self, model) -> None:
        from .. import commonkv

        if self._model is not model:
            self._factors = commonkv.compute_factors(model, self)
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
