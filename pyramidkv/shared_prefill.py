"""One prefill, many methods: the sweep engine behind `run_ruler.py` with several methods or budgets.

Every method here compresses a layer right AFTER that layer's prefill attention, which runs on the full
K/V; the next layer's input is therefore the same whatever the method, and so are the prefill logits.
A sweep can thus run the prompt through the model once, record each layer's prefill inputs (post-RoPE
queries, keys, values), and then, per (method, config): compress a fresh cache from the record and
decode from the shared first token. The predictions equal one `generate` per configuration
(tests/test_shared_prefill.py checks it token for token) at the cost of one prefill plus one decode per
configuration. H2O-scored methods (H2O at every budget, SimCalKV, KeepKV, CaM, ...) share one all-query
column-sum pass per recorded layer (a memo on the record), which on SmolLM2 at 4k costs about what the
prefill does. Measured there (1 thread, a batch of 4 niah_single_1 prompts, shared CPU): prefill 228 s,
then 2.5 s (SnapKV 64: every row stops after its answer) to 50 s (FullKV: one row runs on to RULER's
128 tokens) per configuration's decode.

Memory: the record holds every layer's queries, keys and values of the prompt (SmolLM2 at 4k: ~0.5 GB
in fp32), needed because H2O scores with all prompt queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .cache import CompressedCache
from .methods import KVMethod, PrefillInputs, build_method
from .methods.fullkv import FullKV
from .patch import compress


@dataclass
class _RecordPrefill(FullKV):
    """Keeps everything (like FullKV) and remembers each layer's prefill inputs."""

    name: ClassVar[str] = "RecordPrefill"

    def __post_init__(self):
        super().__post_init__()
        self.records: list[PrefillInputs] = []
        object.__setattr__(self, "_logged", True)  # the cache logs kept counts once per method: not for this one

    def compress(self, x: PrefillInputs, budget: int):
        self.records.append(x)
        return x.keys, x.values


def _cache_from_record(model, method: KVMethod, records: list[PrefillInputs], padding_mask) -> CompressedCache:
    """A CompressedCache in the state generate's prefill would have left it in for `method`."""
    cache = CompressedCache(method, model.config)
    cache.padding_mask = padding_mask
    for x in records:
        cache.layers[x.layer_idx].update(x.keys, x.values)
        # one memo per recorded layer: H2O-scored methods (H2O at every budget, SimCalKV, KeepKV, CaM, ...)
        # compute the all-query column sums once per prompt and layer, not once per configuration
        memo = x.__dict__.setdefault("_column_sums", {})
        cache.compress_layer(x.layer_idx, x.query, x.keys, x.values, x.scaling, score_memo=memo)
    return cache


def record_prefill(model, input_ids, attention_mask, **gen_kwargs) -> tuple[list[PrefillInputs], torch.Tensor]:
    """Each layer's prefill inputs (post-RoPE queries, keys, values, padding) and the greedy first new
    token [B, 1] of one `generate` step (its logits processors included)."""
    recorder = _RecordPrefill(max_capacity_prompt=max(2, input_ids.shape[1] + 1), window_size=1)
    with torch.inference_mode(), compress(model, recorder):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=1, **gen_kwargs)
    return recorder.records, out[:, input_ids.shape[1]:]


def generate_many(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  configs: list[tuple[str, dict]], gen_kwargs: dict, recorded=None) -> list[torch.Tensor]:
    """Greedy new tokens [B, <= max_new_tokens] for each (method, config), from one shared prefill.

    gen_kwargs: what `generate` would get besides inputs and max_new_tokens (eos/pad ids,
    min_new_tokens, ...; greedy). The first new token comes from a shared `generate` of one token (its
    logits processors included); `generate` then continues from it on each method's compressed cache,
    exactly as in its own second step. Rows that ended at the first token are padded like generate does.
    recorded: (records, first token) of an earlier record_prefill of these inputs, to reuse it.
    """
    kwargs = {k: v for k, v in gen_kwargs.items() if k not in ("return_dict_in_generate", "max_new_tokens")}
    kwargs.update(do_sample=False, num_beams=1)
    records, first = recorded or record_prefill(model, input_ids, attention_mask, **kwargs)
    padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
    ids = torch.cat([input_ids, first], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(first)], dim=1)
    rest = dict(kwargs)
    if rest.get("min_new_tokens"):
        rest["min_new_tokens"] -= 1  # the shared first token already counts
    outputs = []
    for method_name, config in configs:
        if max_new_tokens <= 1 or _ended(first, kwargs, model).all():
            outputs.append(first)
            continue
        method = _built(method_name, config)
        with torch.inference_mode(), compress(model, method):
            cache = _cache_from_record(model, method, records, padding)
            out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                 max_new_tokens=max_new_tokens - 1, **rest)
        new = out[:, input_ids.shape[1]:]
        ended = _ended(first, kwargs, model)
        if ended.any():  # generate would have stopped these rows after their first token
            new = new.clone()
            new[ended, 1:] = kwargs.get("pad_token_id", model.generation_config.pad_token_id or 0)
        outputs.append(new)
    return outputs


_BUILT: dict = {}  # (method, config) -> built method: one object per configuration, so it logs once


def _built(name: str, config: dict) -> KVMethod:
    key = (name.lower(), tuple(sorted(config.items())))
    if key not in _BUILT:
        _BUILT[key] = build_method(name, **config)
    return _BUILT[key]


def _ended(first: torch.Tensor, kwargs: dict, model) -> torch.Tensor:
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if not eos:
        return torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
    return torch.isin(first[:, 0], torch.tensor(eos, device=first.device))
