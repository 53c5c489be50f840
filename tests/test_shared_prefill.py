"""The sweep engine (one prefill, many methods) predicts exactly what one generate per method does."""
import pytest
import torch

import pyramidkv
from pyramidkv import predict
from pyramidkv.shared_prefill import generate_many
from tiny_checkpoint import one_torch_thread

_single_thread = pytest.fixture(autouse=True)(one_torch_thread)

CONFIGS = [
    ("FullKV", {}),
    ("SnapKV", {"max_capacity_prompt": 24, "window_size": 4}),
    ("SnapKV", {"max_capacity_prompt": 48, "window_size": 8, "pooling": "avgpool"}),
    ("PyramidKV", {"max_capacity_prompt": 32, "window_size": 4}),
    ("H2O", {"max_capacity_prompt": 32, "window_size": 4}),
    ("StreamingLLM", {"max_capacity_prompt": 20, "window_size": 4}),
    ("L2Norm", {"max_capacity_prompt": 20, "window_size": 4, "skip_layers": 0}),
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = predict.DEFAULT_MODEL_PATH  # the embedded checkpoint: answers depend on what is kept
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


@pytest.mark.parametrize("batch", [1, 2])
def test_one_prefill_many_methods_equals_one_generate_each(model_and_tokenizer, batch):
    from pyramidkv.ruler import generate_sample
    model, tokenizer = model_and_tokenizer
    samples = [generate_sample("niah_single_1", tokenizer, 256 + 64 * i, i, 3) for i in range(batch)]
    prompts = [s["input"] for s in samples]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = {"pad_token_id": tokenizer.pad_token_id}
    shared = generate_many(model, enc.input_ids, enc.attention_mask, 12, CONFIGS, kwargs)
    distinct = set()
    for (method, config), tokens in zip(CONFIGS, shared):
        expected = predict.generate(model, tokenizer, prompts, 12, method, config)
        got = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        assert got == expected, (method, config)
        distinct.add(tuple(got))
    assert len(distinct) > 1  # the configurations really differ, so the comparison means something


def test_stop_tokens_and_min_new_tokens_follow_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    enc = tokenizer([prompt], return_tensors="pt")
    for stop in ([" "], ["."], ["o"]):
        eos = [tokenizer.eos_token_id] + predict.stop_token_ids(tokenizer, stop)
        kwargs = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos, "min_new_tokens": 1}
        shared = generate_many(model, enc.input_ids, enc.attention_mask, 10, CONFIGS[:2], kwargs)
        for (method, config), tokens in zip(CONFIGS[:2], shared):
            expected = predict.generate(model, tokenizer, [prompt], 10, method, config, stop_strings=stop)
            assert tokenizer.batch_decode(tokens, skip_special_tokens=True) == expected


def test_a_sweep_scores_each_layer_once_for_all_h2o_scored_configurations(model_and_tokenizer, monkeypatch):
    """H2O at two budgets and SimCalKV all score with the all-query column sums: one O(S^2) pass per
    recorded layer, not one per configuration (it once cost a 4k SmolLM2 sweep a prefill per H2O cell)."""
    from pyramidkv.methods.h2o import H2O
    model, tokenizer = model_and_tokenizer
    enc = tokenizer(["a b c d e f g h " * 30], return_tensors="pt")
    calls = []
    original = H2O._column_sums
    monkeypatch.setattr(H2O, "_column_sums", lambda self, x: calls.append(x.layer_idx) or original(self, x))
    configs = [("H2O", {"max_capacity_prompt": 32, "window_size": 4}), ("H2O", {"max_capacity_prompt": 64, "window_size": 4}),
               ("SimCalKV", {"max_capacity_prompt": 48, "window_size": 4})]
    shared = generate_many(model, enc.input_ids, enc.attention_mask, 4, configs, {"pad_token_id": tokenizer.pad_token_id})
    assert sorted(calls) == list(range(model.config.num_hidden_layers))
    for (name, config), tokens in zip(configs, shared):  # and the predictions are still one generate's each
        monkeypatch.setattr(H2O, "_column_sums", original)
        with torch.no_grad(), pyramidkv.compress(model, name, **config):
            alone = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(alone[:, enc.input_ids.shape[1]:], tokens), name
