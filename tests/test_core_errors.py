"""Bad input: one-line ValueErrors naming the bad value and the valid choices; FA2 path selection."""

import importlib.util

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import pyramidkv
from conftest import greedy, prompt, tiny_model


def one_line_error(call, *fragments):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_method():
    one_line_error(lambda: pyramidkv.replace_llama("snapkvv"), "'snapkvv'", "SnapKV", "PyramidKV")


def test_budget_not_larger_than_window():
    one_line_error(lambda: pyramidkv.build_method("snapkv", max_capacity_prompt=8, window_size=8),
                   "max_capacity_prompt=8", "window_size=8")


@pytest.mark.parametrize("field,value", [("window_size", 0), ("kernel_size", -1), ("max_capacity_prompt", 0)])
def test_non_positive_settings(field, value):
    one_line_error(lambda: pyramidkv.build_method("snapkv", **{field: value}), f"{field}={value}")


def test_unknown_pooling_and_config_key():
    one_line_error(lambda: pyramidkv.build_method("snapkv", pooling="minpool"), "'minpool'", "avgpool", "maxpool")
    one_line_error(lambda: pyramidkv.build_method("snapkv", budget=3), "budget", "max_capacity_prompt")


def test_unsupported_model():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    one_line_error(lambda: pyramidkv.compress(model, "snapkv").__enter__(), "GPT2LMHeadModel", "LlamaForCausalLM")


def test_unsupported_attention_implementation():
    model = tiny_model()
    model.config._attn_implementation = "flex_attention"
    one_line_error(lambda: pyramidkv.compress(model, "snapkv").__enter__(), "'flex_attention'", "sdpa")


def test_method_names_are_case_insensitive():
    listed = pyramidkv.list_methods()
    assert {"FullKV", "SnapKV", "PyramidKV", "H2O", "StreamingLLM", "L2Norm", "ChunkKV"} <= set(listed)
    for name in listed:  # every registered method, in any case
        for spelling in (name, name.lower(), name.upper()):
            assert pyramidkv.build_method(spelling).name == name


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_2_without_flash_attn_is_a_clear_error():
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    one_line_error(lambda: pyramidkv.compress(model, "snapkv").__enter__(), "flash_attention_2", "flash-attn")


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU with flash-attn",
)
@pytest.mark.parametrize("method", ["FullKV", "SnapKV", "PyramidKV"])
def test_flash_attention_2_matches_sdpa(method):
    """FA2 is selected by attn_implementation and gives the same tokens as sdpa (bf16 on GPU)."""
    outputs = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = tiny_model(attn=attn).to("cuda", torch.bfloat16)
        with pyramidkv.compress(model, method, max_capacity_prompt=64):
            out = greedy(model, prompt(300).cuda(), new_tokens=8)
        assert out.past_key_values.kept_tokens()[0] == (300 if method == "FullKV" else 64)
        outputs[attn] = out.sequences
    assert torch.equal(outputs["sdpa"], outputs["flash_attention_2"])
