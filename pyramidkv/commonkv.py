"""CommonKV storage (Wang et al. 2025, arXiv:2508.16134): cross-layer shared latent K/V.

Parameter sharing (training-free, once per model): layers in groups of `layer_step` consecutive layers
(the last group holds the remainder when layer_step does not divide the layer count); per group the K
and V projection weights of its layers are stacked, [2 * kv_dim * layers, hidden], and factored by an
fp32 SVD W = U S V^T: the shared down-projection A = V^T[:r] (hidden -> r) and per-layer
up-projections U_k, U_v = (U S)[:, :r] split per layer and K/V. k = W_k h = U_k (A h) exactly at full
rank. A layer with its own rank r_l (rank file) uses the first r_l rows of A (the SVD orders them).

Inference: each attention's k_proj / v_proj forward is replaced by _projection_forward. While a
CommonKV cache is active it skips the projection's own matmul: k_proj computes the latent z = A_l h,
hands it to the cache layer and returns U_k z; v_proj returns U_v z. Without one it runs the
projection's own forward, so the output is exactly unchanged.
The LatentLayer stores z (rank r per token, pre-RoPE) and the true position of each slot; update()
returns K = RoPE(U_k z, positions) and V = U_v z per KV head, so attention (GQA included) is unchanged.
With evict_method the layer keeps only the positions the eviction method selects after its prefill
attention (keep_slots / store_compressed); with quant_method="kivi" its latents are stored quantized
(QuantLatentLayer, pyramidkv/commonkv_quant.py).

factorization="whitened" (activation-aware, calibrated on calibration_tokens tokens of calibration_file)
replaces the weight SVD by one of the weights in whitened input coordinates: pyramidkv/commonkv_factors.py.

Factors are cached in memory and on disk (~/.cache/pyramidkv/commonkv/<fingerprint>.pt, fingerprint =
sha1 of the K/V weights + settings, + for "whitened" the factorization, the calibration text's sha1 and
its token ids' sha1), so the SVD runs once per model and setting.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import types
from pathlib import Path

import torch

from . import commonkv_factors as factorization
from .cache import ACTIVE_CACHE, CompressedLayer
from .pos_shift import rotate_half

SUPPORTED_FAMILIES = ("llama", "mistral")
CACHE_DIR = Path(os.environ.get("PYRAMIDKV_CACHE_DIR", Path.home() / ".cache" / "pyramidkv")) / "commonkv"
_MEMORY: dict[str, dict] = {}
SVD_CALLS = [0]  # number of SVDs computed in this process (tests check that a second call loads)


def groups_of(num_layers: int, layer_step: int) -> list[list[int]]:
    """Consecutive groups of layer_step layers; the last one holds the remainder."""
    return [list(range(s, min(s + layer_step, num_layers))) for s in range(0, num_layers, layer_step)]


def _attention_modules(model):
    return [layer.self_attn for layer in model.layers]


def layer_ranks(method, model) -> list[int]:
    """Rank per layer from method.rank / method.rank_file, checked against the model's full ranks."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"CommonKV does not support model family {family!r}; valid choices: {', '.join(SUPPORTED_FAMILIES)}")
    attns = _attention_modules(model)
    num_layers = len(attns)
    hidden = attns[0].k_proj.in_features
    kv_dim = attns[0].k_proj.out_features
    groups = groups_of(num_layers, method.layer_step)
    full = {layer: min(hidden, 2 * kv_dim * len(group)) for group in groups for layer in group}
    if method.rank_file is not None:
        data = json.loads(Path(method.rank_file).read_text())
        ranks = data.get("ranks") if isinstance(data, dict) else data
        if not isinstance(ranks, list) or len(ranks) != num_layers:
            got = len(ranks) if isinstance(ranks, list) else type(ranks).__name__
            raise ValueError(f"rank_file={method.rank_file!r} gives {got} ranks but the model has {num_layers} layers; "
                             f"give a JSON list (or {{\"ranks\": [...]}}) of one rank per layer")
    elif method.rank is None:
        ranks = [full[layer] for layer in range(num_layers)]
    else:
        ranks = [method.rank] * num_layers
    for layer, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= full[layer]:
            raise ValueError(f"rank={rank!r} for layer {layer} is invalid: it must be an integer in 1..{full[layer]} "
                             f"(the full rank of its group of layer_step={method.layer_step})")
    return ranks


def _fingerprint(model, method, ranks) -> str:
    digest = hashlib.sha1()
    for attn in _attention_modules(model):
        for proj in (attn.k_proj, attn.v_proj):
            digest.update(proj.weight.detach().float().cpu().numpy().tobytes())
    digest.update(json.dumps({"layer_step": method.layer_step, "ranks": ranks}).encode())
    extra = factorization.fingerprint_extra(model, method)  # None for "weights": its keys are unchanged
    if extra is not None:
        digest.update(json.dumps(extra, sort_keys=True).encode())
    return digest.hexdigest()


def compute_factors(model, method) -> dict:
    """{"A": [layer] [r_l, hidden], "Uk"/"Uv": [layer] [kv_dim, r_l], "ranks"} (fp32), cached."""
    ranks = layer_ranks(method, model)
    attns = _attention_modules(model)
    if any(attn.k_proj.bias is not None or attn.v_proj.bias is not None for attn in attns):
        raise ValueError("CommonKV does not support k_proj/v_proj biases; valid choices: llama, mistral models")
    key = _fingerprint(model, method, ranks)
    if key in _MEMORY:
        return _MEMORY[key]
    path = CACHE_DIR / f"{key}.pt"
    if path.exists():
        _MEMORY[key] = torch.load(path)
        return _MEMORY[key]
    factors = {"A": [None] * len(attns), "Uk": [None] * len(attns), "Uv": [None] * len(attns), "ranks": ranks}
    kv_dim = attns[0].k_proj.out_features
    with torch.no_grad():
        grams = None if method.factorization == "weights" else factorization.attention_grams(model, method, attns)
        for group in groups_of(len(attns), method.layer_step):
            weights = [torch.cat([attns[l].k_proj.weight, attns[l].v_proj.weight]) for l in group]
            SVD_CALLS[0] += 1
            per_layer = factorization.factor_group(weights, [ranks[l] for l in group],
                                                   None if grams is None else [grams[l] for l in group])
            for layer, (a, up) in zip(group, per_layer):
                factors["A"][layer] = a
                factors["Uk"][layer], factors["Uv"][layer] = up[:kv_dim].contiguous(), up[kv_dim:].contiguous()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # write then rename: runs started together (sweep lanes) never load a half-written file
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(factors, partial)
    os.replace(partial, path)
    _MEMORY[key] = factors
    return factors


def _active_latent_layer(layer_idx):
    cache = ACTIVE_CACHE.get()
    if cache is None or getattr(cache.method, "name", None) != "CommonKV":
        return None, None
    return cache, cache.layers[layer_idx]


def _projection_forward(self, hidden):
    """k_proj / v_proj forward, bound to the projection (types.MethodType, so deepcopy rebinds it). While
    a CommonKV cache is active the projection's own hidden x kv_dim matmul is skipped: k_proj computes
    the latent z = A_l h (handed to the cache layer) and returns U_k z, v_proj reuses z and returns U_v z.
    Otherwise the projection's own forward runs, so its output is exactly unchanged."""
    role, layer_idx = self._pyramidkv_commonkv
    cache, layer = _active_latent_layer(layer_idx)
    if layer is None:
        inner = self.__dict__.get("_pyramidkv_inner_forward")  # a forward someone set before us (accelerate)
        return inner(hidden) if inner is not None else type(self).forward(self, hidden)
    f = cache.method.device_factors(layer_idx, hidden)
    if role == "k" or layer.pending_latent is None:
        layer.pending_latent = hidden @ f["A"].T
    return layer.pending_latent @ (f["Uk"] if role == "k" else f["Uv"]).T


def install_hooks(model) -> None:
    """Idempotent: k_proj / v_proj of every attention get _projection_forward as their forward."""
    for attn in _attention_modules(model):
        if getattr(attn, "_pyramidkv_commonkv_hooks", False):
            continue
        for role, proj in (("k", attn.k_proj), ("v", attn.v_proj)):
            proj._pyramidkv_commonkv = (role, attn.layer_idx)
            if "forward" in proj.__dict__:
                proj._pyramidkv_inner_forward = proj.__dict__["forward"]
            proj.forward = types.MethodType(_projection_forward, proj)
        attn._pyramidkv_commonkv_hooks = True


class LatentLayer(CompressedLayer):
    """Stores per-token latents [B, T, r] (pre-RoPE) and their true positions; rebuilds K/V per forward."""

    def __init__(self, method, layer_idx: int):
        super().__init__()
        self.method, self.layer_idx = method, layer_idx
        self.latents: torch.Tensor | None = None  # [B, T, r]
        self.positions: torch.Tensor | None = None  # [B, T] int64, the RoPE position of each slot
        self.pending_latent: torch.Tensor | None = None  # this forward's new latents, from k_proj (_projection_forward)

        # after a cross-layer merge (commonkv_merge.py), per batch row (rows merge different positions):
        # shared: the group's merged latents, stored once {"latents": [[M_b, r]], "positions": [[M_b]], "owner"};
        # own: this layer's other prefill slots [{"latents": [own_b, r], "positions": [own_b], "order": [T]}]
        # (order: own + merged -> prompt order); latents / positions then hold the decode slots only
        self.shared: dict | None = None
        self.own: list[dict] | None = None

    @property
    def physical_length(self) -> int:
        # slots attention sees (mask columns): own + the group's merged ones
        stored = 0 if self.latents is None else self.latents.shape[1]
        return stored + (0 if self.own is None else self.own[0]["order"].shape[0])

    def _new_positions(self, batch: int, new: int, device) -> torch.Tensor:
        # the positions transformers' generate gives: cumsum of the 2-D mask - 1 (pads: any, they are masked)
        mask = self.method.current_padding_mask()
        if mask is not None and mask.shape[-1] >= self.cumulative_length + new:
            pos = mask.long().cumsum(-1) - 1
            return pos[:, -new:].clamp(min=0).to(device)
        start = self.cumulative_length
        return torch.arange(start, start + new, device=device).expand(batch, new)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        latent = self.pending_latent
        if latent is None:
            raise ValueError("CommonKV: the cache layer got K/V without a latent (k_proj not wrapped); "
                             "run inside pyramidkv.compress(model, 'commonkv') or after replace_*('commonkv')")
        self.pending_latent = None
        batch, new = latent.shape[0], latent.shape[1]
        positions = self._new_positions(batch, new, latent.device)
        self.cumulative_length += new
        if self.latents is None:
            self.latents, self.positions = latent.contiguous(), positions.contiguous()
            self.kept_after_prefill, self.kept_per_row = new, [new] * batch
            # evict_method: the attention hook calls CommonKV.compress after this layer's attention
            self.needs_compression = self.method._evictor is not None
            if not self.needs_compression:
                self._prefill_stored(None)
            if self.method.merge and not self.needs_compression and self.layer_idx == self.method.num_layers - 1:
                from .commonkv_merge import merge_groups  # late: it imports this module

                merge_groups(self.method.cache_layers())
            return key_states, value_states  # this forward's K/V are exactly U z (RoPE applied by the model)
        self._append(latent, positions)
        return self.rebuild(key_states.shape[1], key_states.shape[-1])

    def _append(self, latent: torch.Tensor, positions: torch.Tensor) -> None:
        # decode: appended after the prefill slots
        self.latents = torch.cat([self.latents, latent], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=1)

    def _prefill_stored(self, kept_per_row: list[int] | None) -> None:
        """Called once the prefill's latents are final (kept_per_row: each row's real kept slots, the last
        ones; None = from the padding mask). A storage subclass (commonkv_quant.py) converts them here."""

    def keep_slots(self, keep: torch.Tensor | None) -> None:
        """evict_method: keep prefill slots `keep` [B, K] (row b's kept positions in its last slots, the
        fillers before them hidden by store_compressed's filler_slots); None = every slot."""
        if keep is None:
            return
        keep = keep.to(self.latents.device)
        self.latents = self.latents.gather(1, keep[..., None].expand(-1, -1, self.latents.shape[-1])).contiguous()
        self.positions = self.positions.gather(1, keep).contiguous()

    def store_compressed(self, keys, values, kept_per_row, real_lengths, slot_bias=None) -> None:
        # the latents were kept by keep_slots; only the slot bookkeeping of CompressedLayer's contract
        self.record_kept_slots(self.latents.shape[1], kept_per_row, real_lengths, self.latents.device)
        self._prefill_stored(kept_per_row)
        if self.method.merge and self.layer_idx == self.method.num_layers - 1:  # evict first, then merge
            from .commonkv_merge import merge_groups

            merge_groups(self.method.cache_layers())

    def all_latents(self):
        """(latents, positions) of every slot, merged ones (stored once in `shared`) in prompt order."""
        if self.own is None:
            return self.latents, self.positions
        rows = list(zip(self.own, self.shared["latents"], self.shared["positions"]))
        z = torch.stack([torch.cat([own["latents"], merged])[own["order"]] for own, merged, _ in rows])
        pos = torch.stack([torch.cat([own["positions"], merged])[own["order"]] for own, _, merged in rows])
        return torch.cat([z, self.latents], dim=1), torch.cat([pos, self.positions], dim=1)

    def rebuild(self, kv_heads: int, head_dim: int):
        latents, positions = self.all_latents()
        f = self.method.device_factors(self.layer_idx, latents)
        batch, length, _ = latents.shape
        keys = (latents @ f["Uk"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        values = (latents @ f["Uv"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        cos, sin = self.method.rotary(keys, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return keys * cos + rotate_half(keys) * sin, values

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("CommonKV's latent cache cannot be cropped; valid choices: a fresh cache per generate call")

    # beam search / num_return_sequences / contrastive search reshuffle rows; the latent storage (per-row
    # merged and quantized rows, a group's shared latents) does not follow them yet: refused, not wrong
    def reorder_cache(self, beam_idx) -> None:
        raise ValueError("CommonKV's latent cache cannot reorder batch rows (beam search); valid choices: num_beams=1")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("CommonKV's latent cache cannot repeat batch rows; valid choices: num_return_sequences=1")

    def batch_select_indices(self, indices) -> None:
        raise ValueError("CommonKV's latent cache cannot select batch rows; valid choices: greedy or sampling")

    def reset(self) -> None:
        super().reset()
        self.latents = self.positions = self.pending_latent = self.shared = self.own = None

    def nbytes(self) -> int:
        """Bytes of the latents (positions, B x T int64 per layer, are not counted: see positions_nbytes);
        a group's merged latents are counted once, by the group's first layer."""
        return self._bytes(self.latents, "latents")

    def positions_nbytes(self) -> int:
        return self._bytes(self.positions, "positions")

    def _bytes(self, dense, name: str) -> int:
        tensors = [dense] + [own[name] for own in self.own or []]
        if self.shared is not None and self.shared["owner"] == self.layer_idx:
            tensors += self.shared[name]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

