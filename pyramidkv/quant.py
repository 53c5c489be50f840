"""KIVI-style KV quantization (Liu et al. 2024, arXiv:2402.02750) as a cache layer storage, composable
with every method: the method decides which tokens stay, this decides what each kept token costs.

    pyramidkv.compress(model, "snapkv", max_capacity_prompt=256, quant_method="kivi", nbits=4)

Layout (KIVI's): keys are quantized per channel, in groups of `group_size` consecutive tokens (one
min/zero and one scale per channel and group: key outliers live in fixed channels); values per token,
in groups of `group_size` channels. The most recent max(residual_length, window_size) tokens of a row
stay in full precision (the residual); once a row's residual reaches that count + group_size, its
oldest group_size tokens are quantized into one more group. Codes are bit-packed in uint8 (four 2-bit
or two 4-bit codes per byte; 8-bit codes are one byte each); min and scale are kept in the K/V dtype.

Prefill attention runs on the full-precision K/V (as in KIVI); the method's kept tokens are then
quantized except the residual. Every later attention reads the dequantized view that `update()`
returns: the attention hook never needs to know the storage. The view is rebuilt at every step and
not held, so `nbytes()` counts only what is stored.

Batches: each row is stored on its own, its groups aligned on its own first real token, and fillers /
pads are not stored (they are zeros in the view, on slots the attention mask hides). A padded row is
thus quantized exactly like its single run. Decode-time eviction (max_cache_size / compress_interval)
is refused: evicting inside packed per-channel key groups needs requantization, whose error would add
up at every eviction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .cache import CompressedLayer
from .methods.base import repeat_kv

QUANT_METHODS = ("none", "kivi")
NBITS = (2, 4, 8)


def check_quant_config(method) -> None:
    """One-line ValueErrors for the quantization fields of a KVMethod (called by its __post_init__)."""
    if method.quant_method not in QUANT_METHODS:
        raise ValueError(f"quant_method={method.quant_method!r} is unknown; valid choices: {', '.join(QUANT_METHODS)}")
    nbits = method.nbits
    if isinstance(nbits, bool) or nbits not in NBITS:
        raise ValueError(f"nbits={nbits!r} is invalid; valid choices: {', '.join(map(str, NBITS))}")
    group = method.group_size
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ValueError(f"group_size={group!r} is invalid: it must be a positive integer dividing head_dim")
    residual = method.residual_length
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(f"residual_length={residual!r} is invalid: it must be an integer >= 0")
    if method.quant_method == "kivi" and method.decodes:
        raise ValueError(f"quant_method='kivi' cannot be combined with decode-time eviction (max_cache_size="
                         f"{method.max_cache_size}, compress_interval={method.compress_interval}); valid: "
                         f"quant_method='none', or no max_cache_size / compress_interval")


def quantized_layer_for(method):
    """The storage `KVMethod.new_layer` returns: a QuantizedLayer for quant_method='kivi', else None."""
    if method.quant_method != "kivi":
        return None
    return QuantizedLayer(method.nbits, method.group_size, max(method.residual_length, method.window_size))


# ---- codes ----------------------------------------------------------------------------------------
def pack(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes < 2**nbits [..., D] -> [..., D * nbits / 8]: code i of a byte in bits nbits*i."""
    per_byte = 8 // nbits
    if per_byte == 1:
        return codes
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)  # bits never overlap, so the sum is an OR


def unpack(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    per_byte = 8 // nbits
    if per_byte == 1:
        return packed
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & (2 ** nbits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


_CODE_TABLES: dict = {}  # (nbits, dtype, device) -> [256, codes per byte]: each byte's codes as numbers


def unpack_as(packed: torch.Tensor, nbits: int, dtype: torch.dtype) -> torch.Tensor:
    """unpack(packed, nbits) as `dtype` numbers, by table lookup (one pass; several times faster than
    shifting and masking on CPU)."""
    if nbits == 8:
        return packed.to(dtype)
    key = (nbits, dtype, packed.device)
    if key not in _CODE_TABLES:
        shifts = torch.arange(0, 8, nbits, device=packed.device)
        _CODE_TABLES[key] = ((torch.arange(256, device=packed.device)[:, None] >> shifts) & (2 ** nbits - 1)).to(dtype)
    codes = torch.nn.functional.embedding(packed.int(), _CODE_TABLES[key])
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // nbits))


def quantize(x: torch.Tensor, nbits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/scale quantization of `x` with one group along `dim`: (uint8 codes, min, scale),
    min/scale in x's dtype with `dim` kept as size 1. |x - dequantize| <= scale / 2 per element."""
    low = x.amin(dim, keepdim=True)
    scale = (x.amax(dim, keepdim=True) - low) / (2 ** nbits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = ((x - low) / safe).round_().clamp_(0, 2 ** nbits - 1).to(torch.uint8)
    return codes, low, scale


@dataclass(frozen=True)
class _RowStore:
    """One batch row's stored K/V of one layer (never mutated in place: beams may share it).

    key_codes / value_codes [H, q, D * nbits / 8] packed; key_min / key_scale [H, q / g, D] (per channel
    and token group); value_min / value_scale [H, q, D / g] (per token and channel group); residual
    keys / values [H, r, D] full precision, the row's latest r tokens."""

    key_codes: torch.Tensor
    key_min: torch.Tensor
    key_scale: torch.Tensor
    value_codes: torch.Tensor
    value_min: torch.Tensor
    value_scale: torch.Tensor
    residual_keys: torch.Tensor
    residual_values: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.key_codes.shape[1] + self.residual_keys.shape[1]

    def tensors(self):
        return (self.key_codes, self.key_min, self.key_scale, self.value_codes, self.value_min,
                self.value_scale, self.residual_keys, self.residual_values)


class QuantizedLayer(CompressedLayer):
    """A CompressedLayer whose kept tokens are stored KIVI-quantized (see the module docstring).

    `keys` / `values` read as the dense [B, H, P, D] view (dequantized, rebuilt on each read) once the
    prefill is stored; before that (during the prefill forward) they are the full-precision prompt."""

    def __init__(self, nbits: int = 4, group_size: int = 32, full_precision: int = 32):
        self._dense: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.rows: list[_RowStore] | None = None  # None = dense (before the prefill is stored)
        super().__init__()
        self.nbits, self.group_size, self.full_precision = nbits, group_size, full_precision
        self._slots = 0  # physical slots of the view (fillers + each row's tokens)

    # dense attribute access of the base classes (lazy_initialization, the prefill) sets dense mode
    @property
    def keys(self):
        return self._dense[0] if self.rows is None else self._view(0)

    @keys.setter
    def keys(self, tensor):
        self.rows, self._dense = None, (tensor, self._dense[1])

    @property
    def values(self):
        return self._dense[1] if self.rows is None else self._view(1)

    @values.setter
    def values(self, tensor):
        self.rows, self._dense = None, (self._dense[0], tensor)

    @property
    def physical_length(self) -> int:
        if self.rows is not None:
            return self._slots
        keys = self._dense[0]
        return 0 if keys is None or not self.is_initialized else keys.shape[-2]

    # ---- storing ----------------------------------------------------------------------------------
    def _check_head_dim(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide head_dim={head_dim} (values are "
                             f"quantized in groups of channels); valid: a divisor of {head_dim}")
        if head_dim % (8 // self.nbits):
            raise ValueError(f"head_dim={head_dim} cannot be packed {8 // self.nbits} codes per byte at "
                             f"nbits={self.nbits}; valid: nbits=8")

    def _quantize_tokens(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """keys/values [H, n * g, D] -> packed key codes, key min/scale, value codes, value min/scale."""
        heads, tokens, dim = keys.shape
        g = self.group_size
        key_codes, key_min, key_scale = quantize(keys.reshape(heads, tokens // g, g, dim), self.nbits, dim=2)
        value_codes, value_min, value_scale = quantize(values.reshape(heads, tokens, dim // g, g), self.nbits, dim=3)
        return (pack(key_codes.reshape(heads, tokens, dim), self.nbits), key_min.squeeze(2), key_scale.squeeze(2),
                pack(value_codes.reshape(heads, tokens, dim), self.nbits), value_min.squeeze(3), value_scale.squeeze(3))

    def _flush(self, row: _RowStore) -> _RowStore:
        """Quantize the oldest residual tokens, a group at a time, while more than full_precision +
        group_size - 1 remain in full precision."""
        residual = row.residual_keys.shape[1]
        ready = max(0, (residual - self.full_precision) // self.group_size) * self.group_size
        if ready == 0:
            return row
        new = self._quantize_tokens(row.residual_keys[:, :ready], row.residual_values[:, :ready])
        old = row.tensors()[:6]
        parts = [torch.cat([stored, added], dim=1) for stored, added in zip(old, new)]
        return _RowStore(*parts, row.residual_keys[:, ready:].clone(), row.residual_values[:, ready:].clone())

    def _empty_row(self, keys: torch.Tensor) -> _RowStore:
        heads, _, dim = keys.shape
        codes = keys.new_zeros((heads, 0, dim * self.nbits // 8), dtype=torch.uint8)
        key_stats = keys.new_zeros((heads, 0, dim))
        value_stats = keys.new_zeros((heads, 0, dim // self.group_size))
        return _RowStore(codes, key_stats, key_stats, codes, value_stats, value_stats,
                         keys[:, :0], keys[:, :0])

    def store_compressed(self, keys, values, kept_per_row, real_lengths, slot_bias=None) -> None:
        super().store_compressed(keys, values, kept_per_row, real_lengths, slot_bias)
        self._check_head_dim(keys.shape[-1])
        slots = keys.shape[-2]
        rows = []
        for b, kept in enumerate(kept_per_row):
            real_keys, real_values = keys[b, :, slots - kept:], values[b, :, slots - kept:]
            # clones: a row must not keep the whole prefill tensor alive through a view
            row = replace(self._empty_row(real_keys), residual_keys=real_keys.clone(),
                          residual_values=real_values.clone())
            rows.append(self._flush(row))
        self._dense, self.rows, self._slots = (None, None), rows, slots

    def update(self, key_states, value_states, *args, **kwargs):
        if self.rows is None:  # the prefill forward (and a fresh layer): dense, as the base layer
            return super().update(key_states, value_states, *args, **kwargs)
        self.cumulative_length += key_states.shape[-2]
        heads = self.rows[0].residual_keys.shape[0]
        if key_states.shape[1] != heads:  # gqa_selection="query_head": stored per query head
            key_states = repeat_kv(key_states, heads // key_states.shape[1])
            value_states = repeat_kv(value_states, heads // value_states.shape[1])
        self.rows = [self._flush(replace(row, residual_keys=torch.cat([row.residual_keys, key_states[b]], dim=1),
                                         residual_values=torch.cat([row.residual_values, value_states[b]], dim=1)))
                     for b, row in enumerate(self.rows)]
        self._slots += key_states.shape[-2]
        return self._view(0), self._view(1)

    # ---- reading ----------------------------------------------------------------------------------
    def _dequantize_into(self, out: torch.Tensor, row: _RowStore, which: int) -> None:
        """Write row `row`'s keys (which=0) or values (1) into `out` [H, tokens, D]: the quantized part
        dequantized in one fused multiply-add per element (no temporaries of the view's size), then the
        residual."""
        g = self.group_size
        heads, _, dim = out.shape
        if which == 0:
            codes, low, scale, residual = row.key_codes, row.key_min, row.key_scale, row.residual_keys
            tokens = codes.shape[1]
            target = out[:, :tokens].view(heads, tokens // g, g, dim)
            low, scale, shape = low[:, :, None], scale[:, :, None], target.shape
        else:
            codes, low, scale, residual = row.value_codes, row.value_min, row.value_scale, row.residual_values
            tokens = codes.shape[1]
            target = out[:, :tokens].view(heads, tokens, dim // g, g)
            low, scale, shape = low[..., None], scale[..., None], target.shape
        if tokens:
            torch.addcmul(low, unpack_as(codes, self.nbits, low.dtype).view(shape), scale, out=target)
        out[:, tokens:] = residual

    def _view(self, which: int) -> torch.Tensor:
        """[B, H, P, D]: row b's tokens in its last slots, zeros on its filler / pad slots (rebuilt on
        every read and not held)."""
        first = self.rows[0].residual_keys
        out = first.new_empty((len(self.rows), first.shape[0], self._slots, first.shape[-1]))
        for b, row in enumerate(self.rows):
            fillers = self._slots - row.tokens
            out[b, :, :fillers] = 0
            self._dequantize_into(out[b, :, fillers:], row, which)
        return out

    # ---- batch reshuffles: rows are immutable, so beams may share them ------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.rows is None:
            return super().reorder_cache(beam_idx)
        rows = self.rows
        self._reorder_state(beam_idx)
        self.rows = [rows[i] for i in beam_idx.tolist()]

    def _reorder_state(self, index: torch.Tensor) -> None:
        """Row b of the fillers, slot bias, per-row lists and decode state becomes row index[b]."""
        for name in ("filler_slots", "slot_bias"):
            state = getattr(self, name)
            if state is not None:
                setattr(self, name, state.index_select(0, index.to(state.device)))
        self._reorder_row_lists(index.tolist())
        self.decode_state = {k: v.index_select(0, index.to(v.device)) for k, v in self.decode_state.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is None:
            return super().batch_repeat_interleave(repeats)
        rows = self.rows
        self._reorder_state(torch.arange(len(rows)).repeat_interleave(repeats))
        self.rows = [row for row in rows for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows is None:
            return super().batch_select_indices(indices)
        rows = self.rows
        chosen = torch.arange(len(rows))[indices.cpu() if isinstance(indices, torch.Tensor) else indices]
        self._reorder_state(chosen)
        self.rows = [rows[i] for i in chosen.tolist()]

    def evict(self, keep, fillers) -> None:
        raise ValueError("quant_method='kivi' cannot evict while decoding; valid: quant_method='none'")

    def reset(self) -> None:
        super().reset()
        self.rows, self._dense, self._slots = None, (None, None), 0

    def nbytes(self) -> int:
        """Bytes held: packed codes + min/scale + full-precision residual of every row (a tensor shared
        by several rows, after a beam reshuffle, counted once), plus the slot bias."""
        if self.rows is None:
            return super().nbytes()
        held = 0 if self.slot_bias is None else self.slot_bias.numel() * self.slot_bias.element_size()
        seen = set()
        for row in self.rows:
            for tensor in row.tensors():
                key = (tensor.data_ptr(), tensor.numel())
                if tensor.numel() and key not in seen:
                    seen.add(key)
                    held += tensor.numel() * tensor.element_size()
        return held
