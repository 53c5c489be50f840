"""The compressed KV cache: one `transformers.Cache` subclass, one layer class.

Each layer stores its kept K/V physically (budget tokens per KV head after prefill) and counts the TRUE
number of tokens it has seen. transformers derives RoPE positions and mask sizes from the cache, so the
layer reports `get_seq_length() = true length` and `get_mask_sizes(q) = (physical + q, true - physical)`
— the contract of transformers' own sliding-window layer: kept slot j is mask column j + offset, and
positions stay the true positions.

Decoding appends into a preallocated buffer instead of `torch.cat` (which copies the whole cache every
step); right after prefill the buffer holds exactly the kept tokens, so the bytes then are exact.

Batches: budgets are computed per row from its real length (PyramidKV's schedule differs by length).
A layer stores K = the largest row's count; a row that keeps fewer tokens has them in its last slots
and fillers before them. A row kept whole has exactly as many leading pad columns as fillers, so the
attention mask hides them already; a compressed row below K has more fillers than pad columns, so
the layer records them in `filler_slots` [B, K] and the attention hook hides them.

Merged slots: a merging method may give each kept slot an additive logit bias (`slot_bias`
[B, stored heads, K], fp32; 0 for plain slots): a slot holding the mean key of n merged tokens with bias
ln n draws the attention of n copies. The attention hook adds it to the logits through the float mask
(eager and sdpa; flash-attn takes no additive mask, so a bias there is an error). Slots appended while
decoding carry no bias: the bias covers the prefill slots and later columns read as 0.

Compression while decoding (a method with max_cache_size / compress_interval, methods/decode.py): after
a layer's attention the hook calls `decode_layer`, which asks the method which slots to keep and
compacts them inside the decode buffer (`CompressedLayer.evict`): the buffer is never reallocated, so
the bytes stay flat however long the generation. The layout stays the batch contract above (a row's
real tokens in its last slots, hidden fillers first), so mask column j + offset is still slot j.
"""

from __future__ import annotations

import contextvars
import logging

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import chunked_prefill, pos_shift
from .methods import KVMethod, PrefillInputs, build_method
from .methods.base import gather_tokens, repeat_kv
from .methods.decode import DecodeInputs

logger = logging.getLogger("pyramidkv")

# the cache of the patched forward running in this context (thread); set by pyramidkv.patch
ACTIVE_CACHE: contextvars.ContextVar[CompressedCache | None] = contextvars.ContextVar(
    "pyramidkv_active_cache", default=None
)


class CompressedLayer(DynamicLayer):
    """A layer that keeps what the method chose at prefill and grows by appending during decoding."""

    is_croppable = False

    def __init__(self, growth: int = 256):
        # growth: the most spare slots one reallocation adds (a quarter of the length, at least 16):
        # a short compressed cache must not allocate more than the full cache it replaces, and a long one
        # copies itself once per `growth` steps, which costs far less than a step's attention over it
        super().__init__()
        self.cumulative_length = 0  # true number of tokens seen
        self.growth = growth
        self.needs_compression = False  # set by the prefill update, cleared by `compress`
        self.compress_after_update = False  # chunked prefill: the next update is a chunk to compress again
        self.kept_hidden: torch.Tensor | None = None  # chunked prefill: [B, kept] slots hidden from the vote
        self.peak_prefill_length = 0  # most K/V tokens per head held during prefill (kept + chunk)
        self.kept_after_prefill: int | None = None  # slots stored per head (the largest row's count)
        self.kept_per_row: list[int] | None = None  # real tokens each row kept
        self.prompt_lengths: list[int] | None = None  # real prompt tokens of each row (H2O's ratio budgets)
        self.filler_slots: torch.Tensor | None = None  # [B, K] bool, True = slot the attention must hide
        self.slot_bias: torch.Tensor | None = None  # [B, stored heads, K] fp32 additive logit bias; None = 0
        self.decode_state: dict[str, torch.Tensor] = {}  # a decoding method's per-slot state [B, H, <=P]
        self.decode_forwards = 0  # decode forwards since prefill (compress_interval counts these)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    @property
    def physical_length(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first_update = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        if first_update or self.compress_after_update:
            # prefill (or a prefill chunk, pyramidkv/chunked_prefill.py: kept slots + chunk): attention runs
            # on these K/V; the hook then calls `compress`
            if not first_update:
                key_states = torch.cat([self.keys, key_states], dim=-2)
                value_states = torch.cat([self.values, value_states], dim=-2)
                self.compress_after_update = False
            self.keys, self.values = key_states, value_states
            self.needs_compression = True
            self.peak_prefill_length = max(self.peak_prefill_length, self.physical_length)
            return self.keys, self.values
        if key_states.shape[1] != self.keys.shape[1]:
            # gqa_selection="query_head": the layer stores one head per query head, new tokens come per KV head
            key_states = repeat_kv(key_states, self.keys.shape[1] // key_states.shape[1])
            value_states = repeat_kv(value_states, self.values.shape[1] // value_states.shape[1])
        self._append(key_states, value_states)
        return self.keys, self.values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        length, added = self.physical_length, key_states.shape[-2]
        buffer = self._key_buffer
        # the buffer is valid while self.keys is still its view (crop keeps it, reorder/select do not)
        usable = (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.shape[0] == buffer.shape[0]
            and length + added <= buffer.shape[-2]
        )
        if not usable:
            capacity = length + added + min(self.growth, max(16, length // 4))
            shape = (*self.keys.shape[:2], capacity, self.keys.shape[-1])
            self._key_buffer = self.keys.new_empty(shape)
            self._value_buffer = self.values.new_empty((*shape[:3], self.values.shape[-1]))
            self._key_buffer[:, :, :length] = self.keys
            self._value_buffer[:, :, :length] = self.values
        self._key_buffer[:, :, length : length + added] = key_states
        self._value_buffer[:, :, length : length + added] = value_states
        self.keys = self._key_buffer[:, :, : length + added]
        self.values = self._value_buffer[:, :, : length + added]

    def store_compressed(self, keys, values, kept_per_row: list[int], real_lengths: list[int],
                         slot_bias: torch.Tensor | None = None) -> None:
        self.keys, self.values = keys.contiguous(), values.contiguous()
        if slot_bias is not None and tuple(slot_bias.shape) != tuple(keys.shape[:3]):
            raise ValueError(f"slot_bias of shape {tuple(slot_bias.shape)} does not match the kept slots "
                             f"{tuple(keys.shape[:3])} ([batch, heads, slots])")
        # an all-zero bias (nothing merged) is no bias: attention keeps its boolean / built-in causal mask
        keep_bias = slot_bias is not None and bool(slot_bias.any())
        self.slot_bias = slot_bias.float().contiguous() if keep_bias else None
        self._key_buffer = self._value_buffer = None
        self.record_kept_slots(self.keys.shape[-2], kept_per_row, real_lengths, keys.device)

    def record_kept_slots(self, slots: int, kept_per_row: list[int], real_lengths: list[int], device) -> None:
        """The slot bookkeeping after prefill compression, whatever the storage: slots per row, each row's
        real kept count and prompt length, and the filler slots attention must hide."""
        self.needs_compression = False
        self.kept_after_prefill = slots
        self.kept_per_row = kept_per_row
        self.prompt_lengths = list(real_lengths)
        # fillers on real columns exist only for a compressed row below the layer's slot count
        if any(kept < min(length, slots) for kept, length in zip(kept_per_row, real_lengths)):
            fillers = torch.tensor([slots - kept for kept in kept_per_row], device=device)
            self.filler_slots = torch.arange(slots, device=device)[None, :] < fillers[:, None]
        else:
            self.filler_slots = None

    def evict(self, keep: torch.Tensor, fillers: list[int]) -> None:
        """Keep slots `keep` [B, H, K] (row b's tokens in its last K - fillers[b] slots), compacted in
        place at the start of the decode buffer; bias and decode state follow their slots."""
        slots, before = keep.shape[-1], self.physical_length
        bias = self.attention_bias()
        kept_keys, kept_values = gather_tokens(self.keys, keep), gather_tokens(self.values, keep)
        buffer = self._key_buffer
        if buffer is not None and self.keys.data_ptr() == buffer.data_ptr():
            self._key_buffer[:, :, :slots].copy_(kept_keys)
            self._value_buffer[:, :, :slots].copy_(kept_values)
            self.keys, self.values = self._key_buffer[:, :, :slots], self._value_buffer[:, :, :slots]
        else:
            self.keys, self.values = kept_keys, kept_values
        if bias is not None:
            bias = bias.gather(-1, keep)
            self.slot_bias = bias if bool(bias.any()) else None
        for name, state in self.decode_state.items():  # slots appended since the last eviction read 0
            state = torch.nn.functional.pad(state, (0, max(0, before - state.shape[-1])))
            self.decode_state[name] = state.gather(-1, keep)
        if max(fillers) > 0:
            counts = torch.tensor(fillers, device=keep.device)
            self.filler_slots = torch.arange(slots, device=keep.device)[None, :] < counts[:, None]
        else:
            self.filler_slots = None

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        physical = self.physical_length
        return physical + query_length, self.cumulative_length - physical

    def attention_bias(self) -> torch.Tensor | None:
        """The additive logit bias of every stored slot, [B, heads, physical length] (decode slots 0),
        or None when no slot carries one."""
        if self.slot_bias is None:
            return None
        extra = self.physical_length - self.slot_bias.shape[-1]
        return torch.nn.functional.pad(self.slot_bias, (0, extra)) if extra > 0 else self.slot_bias

    def crop(self, tokens_to_remove: int) -> None:
        before = self.physical_length
        super().crop(tokens_to_remove)
        self.cumulative_length -= before - self.physical_length
        if self.slot_bias is not None and self.slot_bias.shape[-1] > self.physical_length:
            self.slot_bias = self.slot_bias[..., : self.physical_length]

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None
        self.needs_compression = False
        self.kept_after_prefill = self.kept_per_row = self.filler_slots = self.slot_bias = None
        self.prompt_lengths = None
        self.decode_state, self.decode_forwards = {}, 0

    # batch reshuffles (beam search, num_return_sequences, contrastive search) move the fillers too
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.filler_slots is not None:
            self.filler_slots = self.filler_slots.index_select(0, beam_idx.to(self.filler_slots.device))
        if self.slot_bias is not None:
            self.slot_bias = self.slot_bias.index_select(0, beam_idx.to(self.slot_bias.device))
        self._reorder_row_lists(beam_idx.tolist())
        self.decode_state = {k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.decode_state.items()}

    def _reorder_row_lists(self, rows: list[int]) -> None:
        # the per-row Python lists follow the batch rows like the tensors do
        for name in ("kept_per_row", "prompt_lengths"):
            if getattr(self, name) is not None:
                setattr(self, name, [getattr(self, name)[row] for row in rows])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.filler_slots is not None:
            self.filler_slots = self.filler_slots.repeat_interleave(repeats, dim=0)
        if self.slot_bias is not None:
            self.slot_bias = self.slot_bias.repeat_interleave(repeats, dim=0)
        if self.kept_per_row is not None:
            self._reorder_row_lists([row for row in range(len(self.kept_per_row)) for _ in range(repeats)])
        self.decode_state = {k: v.repeat_interleave(repeats, dim=0) for k, v in self.decode_state.items()}

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.filler_slots is not None:
            self.filler_slots = self.filler_slots[indices]
        if self.slot_bias is not None:
            self.slot_bias = self.slot_bias[indices]
        if self.kept_per_row is not None:
            self._reorder_row_lists(torch.arange(len(self.kept_per_row))[indices].tolist())
        self.decode_state = {k: v[indices] for k, v in self.decode_state.items()}

    def nbytes(self) -> int:
        """Bytes of the K/V this layer holds (its buffer's capacity while decoding), plus the slot bias
        of a merging method."""
        held = 0 if self.slot_bias is None else self.slot_bias.numel() * self.slot_bias.element_size()
        for logical, buffer in ((self.keys, self._key_buffer), (self.values, self._value_buffer)):
            if logical is None:
                continue
            tensor = buffer if buffer is not None and logical.data_ptr() == buffer.data_ptr() else logical
            held += tensor.numel() * tensor.element_size()
        return held


class CompressedCache(Cache):
    """KV cache that compresses the prompt once, at prefill, with a method (see `pyramidkv.methods`).

    Create it directly to reuse a compressed cache across `generate` calls:
        cache = CompressedCache("snapkv", model.config, max_capacity_prompt=128)
        model.generate(**inputs, past_key_values=cache)   # inside pyramidkv.compress(...) / after replace_*
    """

    def __init__(self, method: str | KVMethod, config, **method_config):
        """`config`: the model's config, or its number of decoder layers (pyramidkv.compress_cache)."""
        self.method = build_method(method, **method_config)
        num_layers = config if isinstance(config, int) else config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[self.method.new_layer(i, num_layers) for i in range(num_layers)])
        self.padding_mask: torch.Tensor | None = None  # 2-D mask of the current forward
        self._row_budgets: list[list[int]] | None = None  # [row][layer], from each row's real length
        # set during a chunked prefill (chunked_prefill.py): rows' full real lengths / real tokens seen so far
        self.prefill_real_lengths: list[int] | None = None
        self.prefill_seen: list[int] | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if ACTIVE_CACHE.get() is not self:
            if self.layers[layer_idx].get_seq_length() > 0:
                raise ValueError(
                    "this CompressedCache already holds compressed layers (e.g. from pyramidkv.compress_cache), "
                    "whose per-layer lengths and slot terms only pyramidkv's attention hook applies; decode "
                    "inside pyramidkv.compress(model, 'fullkv') or after pyramidkv.replace(...)"
                )
            raise ValueError(
                "a CompressedCache was passed to a model that pyramidkv has not patched, so nothing would be "
                "compressed; run it inside pyramidkv.compress(model, ...) or after pyramidkv.replace(...)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # One mask serves all layers; size it for the largest layer (per-layer budgets), and the
        # attention hook right-slices it for smaller layers.
        physical = max(layer.physical_length for layer in self.layers)
        return physical + query_length, self.layers[layer_idx].get_seq_length() - physical

    def compress_layer(self, layer_idx: int, query, keys, values, scaling: float, score_memo: dict | None = None) -> None:
        """score_memo: scores of these very inputs computed by an earlier method (H2O's column sums, per
        chunk size), shared by a sweep that compresses one recorded prefill many times."""
        layer = self.layers[layer_idx]
        seq_len = keys.shape[-2]
        padding = None
        if self.prefill_seen is not None:  # a prefill chunk: kept slots + chunk (chunked_prefill.py)
            padding = chunked_prefill.chunk_padding(self, layer, seq_len)
        elif self.padding_mask is not None and not bool(self.padding_mask[:, -seq_len:].all()):
            padding = self.padding_mask[:, -seq_len:].to(keys.device).bool()  # layers may sit on other devices (device_map)
        inputs = PrefillInputs(query, keys, values, padding, layer_idx, len(self.layers), scaling)
        if score_memo is not None:
            inputs._column_sums = score_memo  # H2O.score reads and fills it
        lengths = inputs.real_lengths()
        if self._row_budgets is None or layer_idx == 0:
            schedule_lengths = self.prefill_real_lengths or lengths  # chunked: each row's full real length
            schedules = {n: self.method.layer_budgets(n, len(self.layers)) for n in set(schedule_lengths)}
            self._row_budgets = [schedules[n] for n in schedule_lengths]
        cap = self.method.max_cache_size or seq_len  # a decoding method never stores more than its cache size
        budgets = [min(row[layer_idx], n, cap) for row, n in zip(self._row_budgets, lengths)]
        with torch.no_grad():
            stored = self.method.compress(inputs, budgets)  # (keys, values) or (keys, values, slot bias)
            slot_bias = stored[2] if len(stored) > 2 else None
            layer.store_compressed(stored[0], stored[1], budgets, self.prefill_seen or lengths, slot_bias)
            if self.method.pos_shift:
                pos_shift.renumber_after_prefill(self, layer, getattr(inputs, "kept_indices", None), budgets)
            if self.method.decodes:
                layer.decode_state = self.method.decode_prefill_state(inputs, getattr(inputs, "kept_indices", None))
        if layer_idx == len(self.layers) - 1:
            log = logger.info if not getattr(self.method, "_logged", False) else logger.debug
            log("%s kept tokens per layer (prompt %d): %s", self.method.name, seq_len, self.kept_tokens())
            object.__setattr__(self.method, "_logged", True)

    def decode_layer(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """After a decode forward's attention in this layer: let the method update its per-slot state,
        and every compress_interval forwards evict down to its decode budget (methods/decode.py)."""
        layer = self.layers[layer_idx]
        layer.decode_forwards += 1
        with torch.no_grad():
            decode = DecodeInputs(query, layer.keys, layer.values, self._hidden_slots(layer), layer.attention_bias(),
                                  layer_idx, len(self.layers), scaling, layer.decode_state, layer.decode_forwards,
                                  layer.prompt_lengths)
            self.method.decode_observe(decode)
            if layer.decode_forwards % (self.method.compress_interval or 1):
                return
            real = decode.real_counts()
            budgets = self.method.decode_budgets(real, layer_idx, len(self.layers), decode.prompt_lengths)
            if all(b >= n for b, n in zip(budgets, real)):
                return  # nothing to evict
            keep = self.method.decode_select(decode, budgets)
            if keep is None:
                return
            fillers = [keep.shape[-1] - b for b in budgets]
            layer.evict(keep, fillers)
            if self.method.pos_shift:
                pos_shift.renumber_after_eviction(self, layer, keep, decode.hidden, fillers)

    def _hidden_slots(self, layer: CompressedLayer) -> torch.Tensor:
        """[B, P] True = slot holds no token of the row: a filler, or a pad that the 2-D mask hides
        (slot j is mask column j + true length - P)."""
        physical = layer.physical_length
        hidden = torch.zeros(layer.keys.shape[0], physical, dtype=torch.bool, device=layer.keys.device)
        if layer.filler_slots is not None:
            hidden[:, : layer.filler_slots.shape[1]] = layer.filler_slots
        mask = self.padding_mask
        if mask is not None and mask.shape[-1] >= physical:
            hidden |= ~mask[:, mask.shape[-1] - physical:].bool().to(hidden.device)
        return hidden

    def kept_tokens(self) -> list[int | None]:
        """Slots each layer stores per head right after prefill. With one row: the tokens it kept; in a
        batch: the largest row's count (see kept_tokens_per_row for every row's own count)."""
        return [layer.kept_after_prefill for layer in self.layers]

    def kept_tokens_per_row(self) -> list[list[int] | None]:
        """Real tokens each row kept right after prefill, per layer: [layer][row]; a row equals its own
        single-row run's kept_tokens()."""
        return [layer.kept_per_row for layer in self.layers]

    def kept_tokens_per_head(self) -> list[list[list[int]] | None]:
        """Tokens each stored head kept right after prefill, [layer][row][head]: a per-head layer's own
        counts (pyramidkv/perhead.py), a dense layer's row count repeated for every head."""
        return [getattr(layer, "kept_per_head", None) or (None if layer.kept_per_row is None else
                [[kept] * layer.keys.shape[1] for kept in layer.kept_per_row]) for layer in self.layers]

    def physical_lengths(self) -> list[int]:
        return [layer.physical_length for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
