"""Invariant 1: budget >= prompt length, or FullKV, gives exactly the unpatched model's output."""

import pytest
import torch

import pyramidkv
from conftest import greedy, prompt, tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,config", [("FullKV", {}), ("SnapKV", {"max_capacity_prompt": 64}),
                                           ("PyramidKV", {"max_capacity_prompt": 64})])
def test_large_budget_equals_unpatched(family, attn, method, config):
    model = tiny_model(family, attn=attn)
    input_ids = prompt(40)
    reference = greedy(model, input_ids)
    replace = {"llama": pyramidkv.replace_llama, "mistral": pyramidkv.replace_mistral}[family]
    replace(method, **config)
    patched = greedy(model, input_ids)
    assert isinstance(patched.past_key_values, pyramidkv.CompressedCache)
    assert torch.equal(patched.sequences, reference.sequences)
    for ours, theirs in zip(patched.logits, reference.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_restore_and_scoped_form_leave_other_runs_untouched():
    model = tiny_model()
    input_ids = prompt(100)
    reference = greedy(model, input_ids)
    pyramidkv.replace_llama("snapkv", max_capacity_prompt=32)
    assert not torch.equal(greedy(model, input_ids).logits[-1], reference.logits[-1])
    pyramidkv.restore()
    after_restore = greedy(model, input_ids)
    assert not isinstance(after_restore.past_key_values, pyramidkv.CompressedCache)
    torch.testing.assert_close(after_restore.logits[-1], reference.logits[-1], rtol=0, atol=0)

    other = tiny_model(seed=3)
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        assert isinstance(greedy(model, input_ids).past_key_values, pyramidkv.CompressedCache)
        assert not isinstance(greedy(other, input_ids).past_key_values, pyramidkv.CompressedCache)
    assert not isinstance(greedy(model, input_ids).past_key_values, pyramidkv.CompressedCache)


def test_model_loaded_after_replace_is_patched():
    pyramidkv.replace_llama("streamingllm", max_capacity_prompt=32)
    model = tiny_model()
    out = greedy(model, prompt(100), new_tokens=2)
    assert out.past_key_values.kept_tokens() == [32, 32, 32]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_through_the_same_mechanism(family):
    model = tiny_model(family)
    input_ids = prompt(100)
    reference = greedy(model, input_ids)
    replace = {"qwen2": pyramidkv.replace_qwen2, "qwen3": pyramidkv.replace_qwen3}[family]
    replace("fullkv")
    torch.testing.assert_close(greedy(model, input_ids).logits[-1], reference.logits[-1], rtol=0, atol=1e-5)
    replace("snapkv", max_capacity_prompt=32)
    assert greedy(model, input_ids).past_key_values.kept_tokens() == [32, 32, 32]
