"""CommonKV's latents stored KIVI-quantized (quant_method="kivi"; Liu et al. 2024, arXiv:2402.02750),
with the codes, packing and min/scale rule of pyramidkv/quant.py.

Layout: per latent channel, in groups of `group_size` consecutive tokens (one min and one scale per
channel and token group: KIVI's key layout), codes bit-packed along the rank dim; the latest
max(residual_length, window_size) tokens of a row stay in full precision (the residual) and, once the
residual reaches that count + group_size, its oldest group_size tokens become one more group.
Why per channel and not per token (KIVI's value layout): z = A h is one latent for both K = U_k z and
V = U_v z, and its channels' magnitudes are set by the hidden states' direction, which for LLMs carries a
few large, token-stable outlier dimensions (the reason KIVI quantizes keys per channel); a per-token
group along the rank dim would share one scale between those channels and the rest. Grouping along
tokens also puts no group_size constraint on the rank (rank files give any per-layer rank); packing
needs rank divisible by the codes per byte (8 // nbits), checked by check_ranks.

Bytes per row of n tokens, rank r, element size e: q = max(0, (n - f) // g) * g quantized tokens
(f = full-precision tokens, g = group_size): q * r * nbits / 8 (codes) + 2 * (q / g) * r * e (min,
scale) + (n - q) * r * e (residual). Prefill attention runs on full precision (as in KIVI); every
later forward rebuilds K/V from the dequantized latents. Rows are stored on their own (groups aligned on
the row's first real token; pads / fillers not stored, zeros in the view on slots the mask hides), so a
padded row is quantized exactly like its single run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .commonkv import LatentLayer
from .quant import pack, quantize, unpack_as


def check_ranks(ranks: list[int], nbits: int) -> None:
    """One-line error for a layer rank whose codes cannot be packed whole into bytes."""
    per_byte = 8 // nbits
    for layer, rank in enumerate(ranks):
        if rank % per_byte:
            raise ValueError(f"CommonKV quant_method='kivi': rank={rank} of layer {layer} cannot be packed "
                             f"{per_byte} codes per byte at nbits={nbits}; valid: a rank divisible by {per_byte}, or nbits=8")


@dataclass(frozen=True)
class _Row:
    """One row's latents of one layer: codes [q, r * nbits / 8], low / scale [q / g, r], residual [t, r]."""

    codes: torch.Tensor
    low: torch.Tensor
    scale: torch.Tensor
    residual: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.codes.shape[0] + self.residual.shape[0]

    def tensors(self):
        return self.codes, self.low, self.scale, self.residual


class QuantLatentLayer(LatentLayer):
    """A LatentLayer whose latents are stored as above once the prefill's are final; `latents` reads as
    the dense [B, slots, r] view (dequantized, rebuilt on each read and not held)."""

    def __init__(self, method, layer_idx: int):
        self._dense, self.rows, self._slots = None, None, 0
        super().__init__(method, layer_idx)
        self.nbits, self.group_size = method.nbits, method.group_size
        self.full_precision = max(method.residual_length, method.window_size)

    @property
    def latents(self):
        return self._dense if self.rows is None else self._view()

    @latents.setter
    def latents(self, tensor):
        self.rows, self._dense = None, tensor

    @property
    def physical_length(self) -> int:
        return self._slots if self.rows is not None else super().physical_length

    def _flush(self, row: _Row) -> _Row:
        g = self.group_size
        ready = max(0, (row.residual.shape[0] - self.full_precision) // g) * g
        if ready == 0:
            return row
        rank = row.residual.shape[1]
        codes, low, scale = quantize(row.residual[:ready].reshape(ready // g, g, rank), self.nbits, dim=1)
        return _Row(torch.cat([row.codes, pack(codes.reshape(ready, rank), self.nbits)]),
                    torch.cat([row.low, low[:, 0]]), torch.cat([row.scale, scale[:, 0]]),
                    row.residual[ready:].clone())

    def _prefill_stored(self, kept_per_row) -> None:
        dense = self._dense
        batch, slots, rank = dense.shape
        if kept_per_row is None:  # no eviction: each row's real tokens, from the padding mask
            mask = self.method.current_padding_mask()
            kept_per_row = [slots] * batch if mask is None else [int(n) for n in mask[:, -slots:].sum(-1).tolist()]
        empty = dense.new_zeros((0, rank * self.nbits // 8), dtype=torch.uint8)
        rows = [self._flush(_Row(empty, dense.new_zeros((0, rank)), dense.new_zeros((0, rank)),
                                 dense[b, slots - kept:].clone())) for b, kept in enumerate(kept_per_row)]
        self._dense, self.rows, self._slots = None, rows, slots

    def _append(self, latent, positions) -> None:
        self.rows = [self._flush(_Row(row.codes, row.low, row.scale, torch.cat([row.residual, latent[b]])))
                     for b, row in enumerate(self.rows)]
        self._slots += latent.shape[1]
        self.positions = torch.cat([self.positions, positions], dim=1)

    def _dequantize(self, row: _Row) -> torch.Tensor:
        q, rank = row.codes.shape[0], row.residual.shape[1]
        codes = unpack_as(row.codes, self.nbits, row.low.dtype).view(-1, self.group_size, rank)
        quantized = (codes * row.scale[:, None] + row.low[:, None]).reshape(q, rank)
        return torch.cat([quantized, row.residual])

    def _view(self) -> torch.Tensor:
        first = self.rows[0].residual
        out = first.new_zeros((len(self.rows), self._slots, first.shape[1]))
        for b, row in enumerate(self.rows):
            out[b, self._slots - row.tokens:] = self._dequantize(row)
        return out

    def reset(self) -> None:
        super().reset()
        self.rows, self._dense, self._slots = None, None, 0

    def nbytes(self) -> int:
        """Bytes held: packed codes + min/scale + full-precision residual of every row."""
        if self.rows is None:
            return super().nbytes()
        return sum(t.numel() * t.element_size() for row in self.rows for t in row.tensors())
