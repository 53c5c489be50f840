"""Chunked prefill (pyramidkv/chunked_prefill.py): the prompt in chunks, compressed after each.

Oracles: budget >= prompt equals the unpatched model exactly (logits of every position, greedy tokens);
with compression, layer 0's kept keys after the last chunk equal a by-hand simulation of the chunk loop
(layer 0's queries/keys do not depend on the cache, so the full prompt's are the chunks'); a layer
never holds more than budget + chunk tokens; left-padded rows equal their single runs.
"""

import pytest
import torch

import pyramidkv
from pyramidkv.chunked_prefill import chunk_bounds
from pyramidkv.methods import PrefillInputs
from pyramidkv.methods.base import gather_tokens
from conftest import greedy, prompt, tiny_model
from test_core_batch import left_padded


def _run(model, ids, method, mask=None, **config):
    with torch.no_grad(), pyramidkv.compress(model, method, **config):
        cache = pyramidkv.CompressedCache(method, model.config, **config)
        out = greedy(model, ids, attention_mask=mask, past_key_values=cache)
    return out, cache


def test_chunks_are_aligned_to_the_end():
    assert chunk_bounds(50, 16) == [(0, 2), (2, 18), (18, 34), (34, 50)]
    assert chunk_bounds(32, 16) == [(0, 16), (16, 32)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["SnapKV", "PyramidKV"])
def test_budget_covering_the_prompt_equals_the_unpatched_model(attn, method):
    model, ids = tiny_model(attn=attn), prompt(50)
    with torch.no_grad():
        reference_logits = model(ids).logits
        reference = greedy(model, ids)
        with pyramidkv.compress(model, method, max_capacity_prompt=64, prefill_chunk_size=16):
            chunked_logits = model(ids).logits  # every position's logits: hidden states of all chunks
    chunked, cache = _run(model, ids, method, max_capacity_prompt=64, prefill_chunk_size=16)
    assert chunked_logits.shape == reference_logits.shape
    torch.testing.assert_close(chunked_logits, reference_logits, atol=1e-5, rtol=0)
    assert torch.equal(chunked.sequences, reference.sequences)
    for ours, theirs in zip(chunked.logits, reference.logits):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert max(layer.peak_prefill_length for layer in cache.layers) == 50  # nothing compressed


def _layer0_prefill(model, ids):
    """Post-RoPE query/keys/values of layer 0 for the whole prompt (FullKV run)."""
    seen = {}
    with torch.no_grad(), pyramidkv.compress(model, "FullKV"):
        cache = pyramidkv.CompressedCache("FullKV", model.config)
        original = cache.compress_layer

        def record(layer_idx, query, keys, values, scaling):
            if layer_idx == 0:
                seen.update(query=query, keys=keys, values=values, scaling=scaling)
            return original(layer_idx, query, keys, values, scaling)

        cache.compress_layer = record
        model(ids, past_key_values=cache)
    return seen


@pytest.mark.parametrize("method", ["SnapKV", "TOVA", "StreamingLLM"])
def test_kept_set_after_the_last_chunk_matches_a_by_hand_chunk_loop(method):
    model, ids = tiny_model(attn="eager"), prompt(70)
    budget, chunk = 20, 16
    full = _layer0_prefill(model, ids)
    rule = pyramidkv.build_method(method, max_capacity_prompt=budget)
    heads = full["keys"].shape[1]
    kept = torch.empty(1, heads, 0, dtype=torch.long)  # true positions each KV head holds
    for start, end in chunk_bounds(70, chunk):
        candidates = torch.cat([kept, torch.arange(start, end).expand(1, heads, -1)], dim=-1)
        x = PrefillInputs(full["query"][:, :, start:end], gather_tokens(full["keys"], candidates),
                          gather_tokens(full["values"], candidates), None, 0, 3, full["scaling"])
        keep = rule.select(x, min(budget, candidates.shape[-1]))
        kept = candidates if keep is None else candidates.gather(-1, keep)
    assert kept.shape[-1] == budget and not torch.equal(kept[0, 0], torch.arange(70 - budget, 70))
    _, cache = _run(model, ids, method, max_capacity_prompt=budget, prefill_chunk_size=chunk)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == budget + 5  # the budget, then 5 of the 6 greedy tokens (the last is not fed back)
    torch.testing.assert_close(layer.keys[..., :budget, :], gather_tokens(full["keys"], kept), atol=1e-5, rtol=0)
    # the unchunked run keeps a different set (the vote saw the whole prompt): the check can tell them apart
    _, whole = _run(model, ids, method, max_capacity_prompt=budget)
    if method == "SnapKV":
        assert not torch.allclose(whole.layers[0].keys[..., :budget, :], layer.keys[..., :budget, :], atol=1e-5)


@pytest.mark.parametrize("method", ["SnapKV", "PyramidKV"])
def test_peak_kv_length_is_budget_plus_chunk(method):
    model, ids = tiny_model(), prompt(200)
    budget, chunk = 24, 32
    _, cache = _run(model, ids, method, max_capacity_prompt=budget, prefill_chunk_size=chunk)
    schedule = cache.method.layer_budgets(200, 3)
    for layer, layer_budget in zip(cache.layers, schedule):
        assert layer.peak_prefill_length <= layer_budget + chunk
        assert layer.kept_after_prefill == layer_budget  # the full-length schedule, as unchunked
    _, whole = _run(model, ids, method, max_capacity_prompt=budget)
    assert [layer.peak_prefill_length for layer in whole.layers] == [200] * 3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["SnapKV", "PyramidKV", "StreamingLLM"])
def test_padded_rows_equal_single_runs(attn, method):
    model = tiny_model(attn=attn)
    rows = [prompt(length, seed=length) for length in (90, 61, 40, 20)]
    ids, mask = left_padded(rows)
    config = dict(max_capacity_prompt=32, window_size=8, prefill_chunk_size=16)
    batch, _ = _run(model, ids, method, mask=mask, **config)
    for i, row in enumerate(rows):
        single, _ = _run(model, row, method, **config)
        assert torch.equal(batch.sequences[i, ids.shape[1]:], single.sequences[0, row.shape[1]:]), i
        for ours, theirs in zip(batch.logits, single.logits):
            torch.testing.assert_close(ours[i], theirs[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad, words", [
    (dict(prefill_chunk_size=0), "prefill_chunk_size=0 is invalid"),
    (dict(prefill_chunk_size=-4), "prefill_chunk_size=-4 is invalid"),
    (dict(prefill_chunk_size=True), "prefill_chunk_size=True is invalid"),
    (dict(prefill_chunk_size="16"), "prefill_chunk_size='16' is invalid"),
    (dict(prefill_chunk_size=4, window_size=8), "at least window_size=8"),
    (dict(prefill_chunk_size=16, quant_method="kivi"), "not supported with quant_method='kivi'"),
])
def test_bad_values_are_one_line_errors(bad, words):
    with pytest.raises(ValueError, match=words) as error:
        pyramidkv.build_method("SnapKV", **bad)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", ["H2O", "CaM", "AdaKV", "SimCalKV"])
def test_methods_that_cannot_chunk_name_those_that_can(method):
    with pytest.raises(ValueError, match=f"cannot be used with {method}; valid methods: FullKV, SnapKV"):
        pyramidkv.build_method(method, prefill_chunk_size=16)


def test_runner_flag_is_generated():
    from pyramidkv.method_flags import method_fields

    field = next(field for field in method_fields() if field.flag == "prefill_chunk_size")  # --prefill_chunk_size
    assert field.parser() is int
    assert pyramidkv.build_method("SnapKV").config()["prefill_chunk_size"] is None
