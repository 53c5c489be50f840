"""Invariants 2 and 4: physical budget after prefill and decode; true length; GQA stores KV heads."""

import pytest
import torch

import pyramidkv
from conftest import greedy, prompt, tiny_model

# C=40, w=8, beta=20, L=4, s=150 worked by hand: per-layer prefix 32, min 1.6, max 62.4; steps
# 62.4, 42.13, 21.87, 1.6 -> floors 62, 42, 21, 1 (sum 126); remainder 2 to the first layers -> 63, 43,
# 21, 1 (sum 128 = 4*32); plus the window of 8.
PYRAMID_40 = [71, 51, 29, 9]


@pytest.mark.parametrize("method", ["SnapKV", "H2O", "StreamingLLM", "PyramidKV", "L2Norm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cache_physically_holds_budget(method, attn):
    model = tiny_model(attn=attn, layers=4, heads=8, kv_heads=2)
    prompt_len, budget, new_tokens = 150, 40, 7
    config = {"max_capacity_prompt": budget, "window_size": 8}
    if method == "L2Norm":
        config["skip_layers"] = 1
    expected = {"L2Norm": [prompt_len] + [budget] * 3, "PyramidKV": PYRAMID_40}.get(method, [budget] * 4)
    with pyramidkv.compress(model, method, **config):
        # prefill only
        prefill = greedy(model, prompt(prompt_len), new_tokens=1).past_key_values
        assert prefill.kept_tokens() == expected
        for layer, kept in zip(prefill.layers, expected):
            assert layer.keys.shape == (1, 2, kept, 8)  # num_key_value_heads, not query heads
            assert layer.values.shape == (1, 2, kept, 8)
        assert prefill.get_seq_length() == prompt_len
        assert prefill.nbytes() == sum(expected) * 2 * 8 * 2 * 4  # K+V, 2 KV heads, head_dim 8, fp32

        decoded = greedy(model, prompt(prompt_len), new_tokens=new_tokens).past_key_values
        assert decoded.physical_lengths() == [kept + new_tokens - 1 for kept in expected]
        assert decoded.get_seq_length() == prompt_len + new_tokens - 1
        # the decode buffer adds a quarter of the kept length (at least 16, at most 256) once: a short
        # compressed cache never allocates more than the tokens it saves
        capacity = [kept + 1 + min(256, max(16, kept // 4)) for kept in expected]
        assert decoded.nbytes() == sum(capacity) * 2 * 8 * 2 * 4


def test_prompt_shorter_than_budget_is_kept_whole():
    model = tiny_model()
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=128):
        cache = greedy(model, prompt(30), new_tokens=1).past_key_values
    assert cache.kept_tokens() == [30, 30, 30]


def test_decode_buffer_is_not_reallocated_every_step():
    model = tiny_model()
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        out = greedy(model, prompt(100), new_tokens=20)
    layer = out.past_key_values.layers[0]
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()
    assert layer._key_buffer.shape[-2] >= layer.keys.shape[-2]
