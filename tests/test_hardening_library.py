"""Issue 16, library items: no silent no-op (5), per-context scopes (6), config validation (8), one
name registry (11), GQA selection granularity (12). Padded-batch rows (7) are in test_core_batch.py."""

import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache
from transformers.modeling_utils import AttentionInterface

import pyramidkv
from conftest import greedy, prompt, tiny_model
from pyramidkv.methods import PrefillInputs
from test_core_errors import one_line_error


# ---- 5: silent no-ops --------------------------------------------------------------------------
def test_replace_llama_warns_once_for_a_qwen2_model():
    pyramidkv.replace_llama("snapkv", max_capacity_prompt=32)
    model = tiny_model("qwen2")
    with pytest.warns(UserWarning, match="Qwen2Attention runs uncompressed.*replace_qwen2"):
        out = greedy(model, prompt(100), new_tokens=2)
    assert not isinstance(out.past_key_values, pyramidkv.CompressedCache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy(model, prompt(100), new_tokens=2)  # once per class


def test_replace_patches_every_family():
    pyramidkv.replace("snapkv", max_capacity_prompt=32)
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cache = greedy(tiny_model(family), prompt(100), new_tokens=1).past_key_values
        assert cache.kept_tokens() == [32, 32, 32], family
    pyramidkv.restore()
    assert not isinstance(greedy(tiny_model("qwen2"), prompt(100), new_tokens=1).past_key_values,
                          pyramidkv.CompressedCache)


def test_static_cache_under_a_patch_is_an_error():
    model = tiny_model()
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        one_line_error(lambda: greedy(model, prompt(100), cache_implementation="static"),
                       "StaticCache", "LlamaModel", "CompressedCache")
        static = StaticCache(config=model.config, max_cache_len=128)
        one_line_error(lambda: greedy(model, prompt(100), past_key_values=static), "StaticCache")


def test_filled_dynamic_cache_under_a_patch_is_an_error():
    model = tiny_model()
    with torch.no_grad():
        filled = model(prompt(50), past_key_values=DynamicCache(config=model.config)).past_key_values
    pyramidkv.replace_llama("snapkv", max_capacity_prompt=32)
    one_line_error(lambda: greedy(model, prompt(60), past_key_values=filled), "DynamicCache", "50 uncompressed")


def test_compressed_cache_on_an_unpatched_model_is_an_error():
    model = tiny_model()
    cache = pyramidkv.CompressedCache("snapkv", model.config, max_capacity_prompt=32)
    one_line_error(lambda: greedy(model, prompt(100), past_key_values=cache), "CompressedCache", "not patched")
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        assert greedy(model, prompt(100), past_key_values=cache).past_key_values.kept_tokens() == [32] * 3


# ---- 6: one model, two threads, two methods ------------------------------------------------------
def test_scopes_on_one_model_in_two_threads_keep_their_own_method():
    model = tiny_model()
    base = model.model
    settings = {"a": ("snapkv", 32), "b": ("streamingllm", 48)}
    both_inside, both_generated = threading.Barrier(2, timeout=60), threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def run(name):
        method, budget = settings[name]
        try:
            with pyramidkv.compress(model, method, max_capacity_prompt=budget):
                both_inside.wait()  # both scopes are open before either generates
                caches = [greedy(model, prompt(100, seed=s), new_tokens=2).past_key_values for s in (1, 2)]
                both_generated.wait()  # and stay open until both have generated
            results[name] = [(cache.method.name, cache.kept_tokens()) for cache in caches]
        except Exception as error:  # reported below, in the main thread
            errors.append(error)
            both_inside.abort()
            both_generated.abort()

    threads = [threading.Thread(target=run, args=(name,)) for name in settings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results["a"] == [("SnapKV", [32] * 3)] * 2
    assert results["b"] == [("StreamingLLM", [48] * 3)] * 2
    assert "forward" not in vars(base)  # the patch is gone once both blocks ended, attention wrappers too
    assert not hasattr(AttentionInterface._global_mapping["sdpa"], "__pyramidkv_wrapped__")
    assert not isinstance(greedy(model, prompt(100), new_tokens=1).past_key_values, pyramidkv.CompressedCache)


def test_nested_scopes_restore_the_outer_method():
    model = tiny_model()
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        with pyramidkv.compress(model, "snapkv", max_capacity_prompt=40):
            assert greedy(model, prompt(100), new_tokens=1).past_key_values.kept_tokens() == [40] * 3
        assert greedy(model, prompt(100), new_tokens=1).past_key_values.kept_tokens() == [32] * 3
    assert "forward" not in vars(model.model)


# ---- 8: config validation ----------------------------------------------------------------------
def prefill(seq_len, heads=2, padding_mask=None):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1 if padding_mask is None else padding_mask.shape[0], heads, seq_len, 4) for _ in range(3))
    return PrefillInputs(q, k, v, padding_mask, 0, 1, 0.5)


def test_streamingllm_with_more_sinks_than_prefix_budget_keeps_the_first_ones():
    method = pyramidkv.build_method("streamingllm", max_capacity_prompt=12, window_size=8, sink_size=10)
    keep = method.select(prefill(20), 12)
    assert keep[0, 0].tolist() == [0, 1, 2, 3] + list(range(12, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :5] = False  # row 1: 5 pads, its first real token is position 5
    keep = method.select(prefill(20, padding_mask=mask), 12)
    assert keep[1, 0].tolist() == [5, 6, 7, 8] + list(range(12, 20))


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_l2norm_skip_layers_must_be_a_non_negative_int(value):
    one_line_error(lambda: pyramidkv.build_method("l2norm", skip_layers=value), f"skip_layers={value!r}", "integer")


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.5, "20"])
def test_pyramidkv_beta_must_be_finite(value):
    one_line_error(lambda: pyramidkv.build_method("pyramidkv", beta=value), f"beta={value!r}", "finite")


def test_even_kernel_is_rejected():
    one_line_error(lambda: pyramidkv.build_method("snapkv", kernel_size=6), "kernel_size=6", "odd", "5", "7")


# ---- 11: one registry of names -----------------------------------------------------------------
def test_canonical_name_resolves_case_and_aliases():
    assert pyramidkv.canonical_name is pyramidkv.methods.canonical_name
    for given, canonical in [("knorm", "L2Norm"), ("KnormPress", "L2Norm"), ("streaming", "StreamingLLM"),
                             ("SNAPKV", "SnapKV"), ("pyramidkv", "PyramidKV"), ("FullKV", "FullKV")]:
        assert pyramidkv.canonical_name(given) == canonical
    one_line_error(lambda: pyramidkv.canonical_name("snapk"), "'snapk'", "SnapKV", "L2Norm", "knorm", "streaming")


# ---- 12: GQA selection per query head ----------------------------------------------------------
def test_gqa_selection_is_validated():
    one_line_error(lambda: pyramidkv.build_method("snapkv", gqa_selection="head"), "'head'", "kv_head", "query_head")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["SnapKV", "PyramidKV", "H2O"])
def test_query_head_storage_with_large_budget_equals_unpatched(attn, method):
    model = tiny_model(attn=attn, heads=8, kv_heads=2)
    ids = prompt(40)
    reference = greedy(model, ids)
    with pyramidkv.compress(model, method, max_capacity_prompt=64, gqa_selection="query_head"):
        ours = greedy(model, ids)
    assert torch.equal(ours.sequences, reference.sequences)
    for mine, theirs in zip(ours.logits, reference.logits):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    for layer in ours.past_key_values.layers:  # 8 query heads stored, through decoding
        assert layer.keys.shape == (1, 8, 40 + 5, 8)


def test_query_head_cache_bytes_follow_the_formula():
    model = tiny_model(layers=3, heads=8, kv_heads=2)
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=32, gqa_selection="query_head"):
        cache = greedy(model, prompt(100), new_tokens=1).past_key_values
    assert cache.kept_tokens() == [32] * 3
    assert cache.nbytes() == 3 * 32 * 8 * 8 * 2 * 4  # layers * kept * query heads * head_dim * (K+V) * fp32
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        assert greedy(model, prompt(100), new_tokens=1).past_key_values.nbytes() == 3 * 32 * 2 * 8 * 2 * 4


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
def test_query_head_selection_keeps_each_heads_own_top_tokens(pooling):
    capacity, window, kernel, length, heads, kv_heads = 24, 6, 5, 80, 8, 2
    model = tiny_model(attn="eager", layers=2, heads=heads, kv_heads=kv_heads)
    ids = prompt(length)
    with torch.no_grad():
        full = model(ids, output_attentions=True, use_cache=True)
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=capacity, window_size=window, kernel_size=kernel,
                            pooling=pooling, gqa_selection="query_head"):
        cache = greedy(model, ids, new_tokens=1).past_key_values
    differs_in_group = False
    for layer_idx, attention in enumerate(full.attentions):  # [1, 8 query heads, S, S]
        votes = attention[0, :, -window:, : length - window].sum(dim=1)  # [8, S-w], no group mean
        pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
        pooled = pool(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        full_keys = full.past_key_values.layers[layer_idx].keys[0]  # [2 KV heads, S, D]
        stored = cache.layers[layer_idx].keys[0]
        assert stored.shape == (heads, capacity, 8)
        kept_sets = []
        for head in range(heads):
            # maxpool plateaus tie within one head: the lowest position wins (stable sort), our documented rule
            order = pooled[head].sort(descending=True, stable=True).indices
            top = sorted(order[: capacity - window].tolist())
            kept_sets.append(top)
            expected = top + list(range(length - window, length))
            torch.testing.assert_close(stored[head], full_keys[head // 4, expected], rtol=0, atol=1e-6)
        differs_in_group |= any(kept_sets[h] != kept_sets[h - h % 4] for h in range(heads))
    assert differs_in_group  # the test can tell per-query-head from per-KV-head selection


def test_query_head_selection_in_a_padded_batch_equals_single_runs():
    model = tiny_model(heads=8, kv_heads=2)
    rows = [prompt(90, seed=90), prompt(50, seed=50)]
    ids = torch.zeros(2, 90, dtype=torch.long)
    mask = torch.zeros(2, 90, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 90 - row.shape[1] :], mask[i, 90 - row.shape[1] :] = row[0], 1
    with pyramidkv.compress(model, "pyramidkv", max_capacity_prompt=32, gqa_selection="query_head"):
        batched = greedy(model, ids, attention_mask=mask)
        singles = [greedy(model, row) for row in rows]
    for b, single in enumerate(singles):
        for batch_logits, single_logits in zip(batched.logits, single.logits):
            torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)


def test_filler_slots_are_hidden_in_every_mask_format():
    from pyramidkv.patch import _hide_filler_slots

    fillers = torch.tensor([[True, True, False], [False, False, False]])  # row 0: its first 2 slots are fillers
    query, key = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 5, 8)  # 2 queries over 5 cache slots
    causal = torch.tensor([[True, True, True, True, False], [True] * 5])
    expected = causal[None, None].repeat(2, 1, 1, 1)
    expected[0, :, :, :2] = False
    for mask in (None, causal[None, None]):  # sdpa: no mask, or one shared by the batch
        assert torch.equal(_hide_filler_slots(mask, fillers, query, key, "sdpa"), expected)
    additive = _hide_filler_slots(None, fillers, query, key, "eager")
    assert torch.equal(additive == 0, expected)
    assert additive.dtype == torch.float32 and additive.min() == torch.finfo(torch.float32).min
    flash = _hide_filler_slots(torch.ones(2, 5, dtype=torch.bool), fillers, query, key, "flash")
    assert flash.tolist() == [[False, False, True, True, True], [True] * 5]
    assert torch.equal(_hide_filler_slots(None, fillers, query, key, "flash"), flash)
