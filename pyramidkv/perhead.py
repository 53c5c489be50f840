"""Per-head storage: each KV head holds only its own tokens (AdaKV, HeadKV), so the saving is real.

Layout of one layer after prefill (batch B, stored heads H, head dim D):
- `flat_keys` / `flat_values` [N, D]: the kept prompt tokens of every (row, head) segment back to back,
  segment (b, h) at `offsets[b*H + h] : offsets[b*H + h + 1]` (int32 [B*H + 1], flash-attn's
  cu_seqlens). Nothing is padded to the longest head; pads of a left-padded row are not stored at all.
- decode tokens: every decode step adds the same number of tokens to every head of every row, so they
  live in one dense preallocated buffer [B, H, capacity, D] (grown like CompressedLayer._append: a
  decode step never copies the prompt part). Logically they follow each head's own tokens.
  `_decode_hidden` [B, capacity] marks decode columns that were pads of their row (never in `generate`).

Bytes: sum over heads of kept x D x 2 (K and V) x element size, plus the offsets and the decode
buffer's capacity (`nbytes`). Positions are not stored: RoPE is already in the keys.

Attention: the hook in pyramidkv.patch calls `attend` for this layer once it is compressed. `update`
then returns only the step's new K/V, so the mask the hook passes covers exactly the new columns
(causal among them, plus their padding). On CPU (eager/sdpa) attention runs per (row, KV head) over
[its own tokens ; decode tokens] with one softmax; with flash_attention_2 the prompt part goes through
flash_attn_varlen_func (one sequence per (row, KV head), its query heads as heads) and the decode part
through flash_attn_func, merged by their log-sum-exp.

Not supported (one-line errors): decode-time eviction, quantization, beam search / batch reshuffles
and crop.
"""

from __future__ import annotations

import torch

from .cache import CompressedLayer
from .methods.base import repeat_kv


class PerHeadLayer(CompressedLayer):
    attends_itself = True  # pyramidkv.patch: once compressed, this layer runs its own attention

    def __init__(self, growth: int = 256):
        super().__init__(growth)
        self._clear()

    def _clear(self) -> None:
        self.flat_keys = self.flat_values = None
        self.offsets: torch.Tensor | None = None  # int32 [B*H + 1]
        self._offsets: list[int] | None = None  # the same on the host (no device sync per step)
        self.kept_per_head: list[list[int]] | None = None  # [row][head] prompt tokens kept
        self.decode_length = 0
        self._decode_hidden: torch.Tensor | None = None

    @property
    def physical_length(self) -> int:
        if self.kept_per_head is None:
            return super().physical_length
        return max(max(row) for row in self.kept_per_head) + self.decode_length

    def update(self, key_states, value_states, *args, **kwargs):
        if self.kept_per_head is None:  # prefill: full K/V for the hook, then store_compressed
            return super().update(key_states, value_states, *args, **kwargs)
        self.cumulative_length += key_states.shape[-2]
        heads = self.keys.shape[1]
        if key_states.shape[1] != heads:  # gqa_selection="query_head": one stored head per query head
            key_states = repeat_kv(key_states, heads // key_states.shape[1])
            value_states = repeat_kv(value_states, heads // value_states.shape[1])
        self._append_decode(key_states, value_states)
        return key_states, value_states

    def _append_decode(self, key_states, value_states) -> None:
        length, added = self.decode_length, key_states.shape[-2]
        if self._key_buffer is None or length + added > self._key_buffer.shape[-2]:
            mean_kept = self.flat_keys.shape[0] // max(1, len(self._offsets) - 1)
            capacity = length + added + min(self.growth, max(16, (length + mean_kept) // 4))
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])
            keys, values = key_states.new_empty(shape), value_states.new_empty((*shape[:3], value_states.shape[-1]))
            hidden = torch.zeros(shape[0], capacity, dtype=torch.bool, device=key_states.device)
            if length:
                keys[:, :, :length], values[:, :, :length] = self.keys, self.values
                hidden[:, :length] = self._decode_hidden[:, :length]
            self._key_buffer, self._value_buffer, self._decode_hidden = keys, values, hidden
        self._key_buffer[:, :, length : length + added] = key_states
        self._value_buffer[:, :, length : length + added] = value_states
        self._decode_hidden[:, length : length + added] = False
        self.decode_length = length + added
        self.keys = self._key_buffer[:, :, : self.decode_length]
        self.values = self._value_buffer[:, :, : self.decode_length]

    def store_compressed(self, keys, values, kept_per_row, real_lengths, slot_bias=None) -> None:
        """keys/values [B, H, K, D]: each head's kept tokens among its K slots; `slot_bias` [B, H, K]:
        0 on the slots a head keeps, -inf on the others (what a masking-only implementation would add
        to the logits); only the kept slots are stored. None = every slot kept."""
        held = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device) if slot_bias is None \
            else torch.isfinite(slot_bias)
        counts = held.sum(-1)  # [B, H]
        self.flat_keys, self.flat_values = keys[held].contiguous(), values[held].contiguous()
        self._offsets = [0] + torch.cumsum(counts.flatten(), 0).tolist()
        self.offsets = torch.tensor(self._offsets, dtype=torch.int32, device=keys.device)
        self.kept_per_head = counts.tolist()
        heads = keys.shape[1]
        self.kept_per_row = [round(sum(row) / heads) for row in self.kept_per_head]
        self.kept_after_prefill = max(self.kept_per_row)
        self.keys, self.values = keys[:, :, :0].contiguous(), values[:, :, :0].contiguous()  # decode part: empty
        self._key_buffer = self._value_buffer = self._decode_hidden = None
        self.decode_length = 0
        self.needs_compression = False
        self.filler_slots = self.slot_bias = None

    def head_keys(self, row: int, head: int) -> torch.Tensor:
        """The prompt keys kept by one (row, stored head), [kept, D] (a view)."""
        index = row * self.keys.shape[1] + head
        return self.flat_keys[self._offsets[index] : self._offsets[index + 1]]

    def head_values(self, row: int, head: int) -> torch.Tensor:
        index = row * self.keys.shape[1] + head
        return self.flat_values[self._offsets[index] : self._offsets[index + 1]]

    # ---- attention ------------------------------------------------------------------------------
    def attend(self, module, query, attention_mask, scaling: float, kind: str):
        """Attention of `query` [B, Hq, q, D] over every head's own tokens; returns ([B, q, Hq, D], None)
        like transformers' attention functions. `attention_mask`: the hook's mask sliced to the q new
        columns (bool / additive float [B|1, 1, q, q], flash's 2-D keep-mask, or None = causal)."""
        batch, _, q_len, _ = query.shape
        new_visible = _new_block_visibility(attention_mask, batch, q_len, kind, query.device)  # [B, q, q]
        total = self.decode_length
        # a new column that the step's last query cannot see is a pad of its row: hidden from later steps
        self._decode_hidden[:, total - q_len : total] = ~new_visible[:, -1, :]
        decode_visible = (~self._decode_hidden[:, :total])[:, None, :].expand(batch, q_len, total).clone()
        decode_visible[:, :, total - q_len :] = new_visible
        if kind == "flash":
            if not bool(decode_visible[:, -1].all()):
                raise ValueError("per-head storage with flash_attention_2 needs every decoded token to be real "
                                 "(a padded decode step was given); valid choices for it: eager, sdpa")
            return _flash_attend(self, query, scaling), None
        return self._cpu_attend(query, decode_visible, scaling), None

    def _cpu_attend(self, query, decode_visible, scaling: float) -> torch.Tensor:
        batch, query_heads, q_len, dim = query.shape
        heads = self.keys.shape[1]
        groups = query_heads // heads
        output = query.new_empty(batch, query_heads, q_len, self.values.shape[-1])
        hidden = ~decode_visible[:, None]  # [B, 1, q, T]
        for row in range(batch):
            for head in range(heads):
                q = query[row, head * groups : (head + 1) * groups]  # [g, q, D]
                keys, values = self.head_keys(row, head), self.head_values(row, head)
                own = torch.matmul(q, keys.transpose(0, 1))  # [g, q, n]
                recent = torch.matmul(q, self.keys[row, head].transpose(0, 1)).masked_fill(
                    hidden[row], float("-inf"))  # [g, q, T]
                logits = torch.cat([own, recent], dim=-1) * scaling
                weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
                n = keys.shape[0]
                output[row, head * groups : (head + 1) * groups] = (
                    torch.matmul(weights[..., :n], values) + torch.matmul(weights[..., n:], self.values[row, head]))
        return output.transpose(1, 2).contiguous()

    # ---- bytes and unsupported operations -----------------------------------------------------------
    def nbytes(self) -> int:
        """K/V of every head's own tokens + the decode buffer's capacity + the index (offsets, pad flags)."""
        if self.kept_per_head is None:
            return super().nbytes()
        tensors = [self.flat_keys, self.flat_values, self.offsets]
        if self._key_buffer is not None:
            tensors += [self._key_buffer, self._value_buffer, self._decode_hidden]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        super().reset()
        self._clear()

    def _unsupported(self, *args, **kwargs):
        raise ValueError("per-head storage (AdaKV, HeadKV) does not support beam search, batch reshuffles or "
                         "crop yet; valid: greedy or sampled generation with num_beams=1")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


def _new_block_visibility(mask, batch: int, q_len: int, kind: str, device) -> torch.Tensor:
    """[B, q, q] bool: new query i sees new column j (causal, and not a pad)."""
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    if mask is None:
        return causal.expand(batch, q_len, q_len)
    if kind == "flash":  # 2-D keep-mask [B, kv]: padding only, causal implied
        return causal[None] & mask[:, -q_len:].bool().to(device)[:, None, :]
    block = mask[:, 0, -q_len:, -q_len:]
    visible = block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2
    return visible.to(device).expand(batch, q_len, q_len)


def _flash_attend(layer: PerHeadLayer, query, scaling: float) -> torch.Tensor:
    """flash-attn: the prompt part with the varlen kernel (sequence = one (row, KV head), heads = its
    query heads; no gap between segments), the decode part dense; merged by log-sum-exp."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # lazy: CUDA-only package

    batch, query_heads, q_len, dim = query.shape
    heads = layer.keys.shape[1]
    groups = query_heads // heads
    segments = batch * heads
    packed_q = query.reshape(batch, heads, groups, q_len, dim).permute(0, 1, 3, 2, 4).reshape(segments * q_len, groups, dim)
    cu_q = torch.arange(0, segments + 1, dtype=torch.int32, device=query.device) * q_len
    max_kept = max(max(row) for row in layer.kept_per_head)
    own_out, own_lse, *_ = flash_attn_varlen_func(
        packed_q, layer.flat_keys.unsqueeze(1), layer.flat_values.unsqueeze(1), cu_q, layer.offsets, q_len, max_kept,
        softmax_scale=scaling, causal=False, return_attn_probs=True)
    # own_out [segments*q, g, D] -> [B, q, Hq, D]; own_lse [g, segments*q] -> [B, q, Hq]
    own_out = own_out.reshape(batch, heads, q_len, groups, -1).permute(0, 2, 1, 3, 4).reshape(batch, q_len, query_heads, -1)
    own_lse = own_lse.reshape(groups, batch, heads, q_len).permute(1, 3, 2, 0).reshape(batch, q_len, query_heads)
    recent_out, recent_lse, *_ = flash_attn_func(
        query.transpose(1, 2), layer.keys.transpose(1, 2), layer.values.transpose(1, 2),
        softmax_scale=scaling, causal=True, return_attn_probs=True)
    recent_lse = recent_lse.transpose(1, 2)  # [B, Hq, q] -> [B, q, Hq]
    top = torch.maximum(own_lse, recent_lse)
    own_w, recent_w = torch.exp(own_lse - top), torch.exp(recent_lse - top)
    merged = (own_out.float() * own_w[..., None] + recent_out.float() * recent_w[..., None]) / (own_w + recent_w)[..., None]
    return merged.to(query.dtype)
