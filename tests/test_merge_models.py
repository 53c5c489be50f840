"""The merging methods inside real (tiny) models: budget >= prompt changes nothing, every padded row
equals its own single run (per-row ratio budgets, fillers and the logit bias together), the bias is
stored only where tokens were merged, and the cache bytes count it."""

import pytest
import torch

import pyramidkv
from conftest import greedy, prompt, tiny_model
from test_core_batch import left_padded

MERGING = [("SimCalKV", {}), ("SimCalKV", {"calibration": "released"}), ("KeepKV", {}),
           ("PyramidInfer", {}), ("CaM", {})]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,config", MERGING)
def test_large_budget_equals_unpatched(attn, method, config):
    model = tiny_model(attn=attn)
    input_ids = prompt(40)
    reference = greedy(model, input_ids)
    with pyramidkv.compress(model, method, max_capacity_prompt=64, **config):
        patched = greedy(model, input_ids)
    assert torch.equal(patched.sequences, reference.sequences)
    for ours, theirs in zip(patched.logits, reference.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert all(layer.slot_bias is None for layer in patched.past_key_values.layers)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,config", MERGING)
@pytest.mark.parametrize("budget", [{"compress_ratio": 0.4}, {"max_capacity_prompt": 24}])
def test_padded_rows_equal_single_runs(attn, method, config, budget):
    model = tiny_model(attn=attn)
    rows = [prompt(length, seed=length) for length in (50, 31, 20)]
    ids, mask = left_padded(rows)
    with pyramidkv.compress(model, method, window_size=4, **budget, **config):
        batched = greedy(model, ids, attention_mask=mask)
        singles = [greedy(model, row) for row in rows]
    per_row = batched.past_key_values.kept_tokens_per_row()
    for b, single in enumerate(singles):
        assert torch.equal(batched.sequences[b, ids.shape[1]:], single.sequences[0, rows[b].shape[1]:])
        for batch_logits, single_logits in zip(batched.logits, single.logits):
            torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)
        assert [layer[b] for layer in per_row] == single.past_key_values.kept_tokens()


def test_ratio_budget_is_per_row_and_exact_calibration_stores_a_bias():
    model = tiny_model()
    rows = [prompt(length, seed=length) for length in (50, 20)]
    ids, mask = left_padded(rows)
    with pyramidkv.compress(model, "simcalkv", compress_ratio=0.4, window_size=4):
        cache = greedy(model, ids, attention_mask=mask, new_tokens=1).past_key_values
    # 50 - floor(0.4 * 50) = 30 and 20 - floor(0.4 * 20) = 12 tokens, in every layer
    assert cache.kept_tokens_per_row() == [[30, 12]] * 3
    layer = cache.layers[0]
    assert layer.slot_bias is not None and layer.slot_bias.shape == (2, 2, 30)
    assert bool((layer.slot_bias[1, :, :18] == 0).all())  # row 1's filler slots carry no bias
    assert bool((layer.slot_bias >= 0).all()) and bool((layer.slot_bias > 0).any())
    kv_bytes = sum(l.keys.numel() * 4 + l.values.numel() * 4 for l in cache.layers)
    bias_bytes = sum(l.slot_bias.numel() * 4 for l in cache.layers if l.slot_bias is not None)
    assert cache.nbytes() == kv_bytes + bias_bytes


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_query_head_storage_carries_the_bias_per_query_head(attn):
    model = tiny_model(attn=attn)
    rows = [prompt(length, seed=length) for length in (40, 25)]
    ids, mask = left_padded(rows)
    with pyramidkv.compress(model, "simcalkv", compress_ratio=0.5, window_size=4, gqa_selection="query_head"):
        batched = greedy(model, ids, attention_mask=mask)
        singles = [greedy(model, row) for row in rows]
    assert batched.past_key_values.layers[0].slot_bias.shape[1] == 4  # one bias row per query head
    for b, single in enumerate(singles):
        for batch_logits, single_logits in zip(batched.logits, single.logits):
            torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
def test_one_shared_prefill_equals_one_generate_each_for_the_merging_methods(batch):
    from pyramidkv.shared_prefill import generate_many

    model = tiny_model()
    rows = [prompt(length, seed=length) for length in (50, 31)][:batch]
    ids, mask = left_padded(rows)
    configs = [("SimCalKV", {"compress_ratio": 0.5, "window_size": 4}),
               ("SimCalKV", {"compress_ratio": 0.5, "window_size": 4, "calibration": "released"}),
               ("KeepKV", {"keep_ratio": 0.4, "window_size": 4}), ("CaM", {"max_capacity_prompt": 16, "window_size": 4}),
               ("PyramidInfer", {"compress_ratio": 0.3, "window_size": 4})]
    shared = generate_many(model, ids, mask, 6, configs, {"pad_token_id": 0})
    for (method, config), tokens in zip(configs, shared):
        with pyramidkv.compress(model, method, **config):
            expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(tokens, expected[:, ids.shape[1]:]), (method, config)
