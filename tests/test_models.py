"""Model resolution (short names, GGUF files, checkpoint dirs, hub ids) and the real default model.

The SmolLM2 tests load the real pretrained model from the registry package (make setup installs it);
they are the CI guard that the default model works end to end."""
import os

import pytest
import torch

from pyramidkv import models, predict
from tiny_checkpoint import build_tiny_checkpoint


def test_short_names_resolve_without_loading():
    tiny = models.resolve_model("tiny")
    assert tiny.kind == "dir" and tiny.path == models.TINY_CHECKPOINT and tiny.name == "pyramidkv-tiny-llama"
    smol = models.resolve_model("SmolLM2")  # any case
    assert smol.kind == "gguf" and smol.path.endswith(models.SMOLLM2_FILE) and os.path.isfile(smol.path)
    assert smol.name == "SmolLM2-135M-Instruct"
    assert models.resolve_model("meta-llama/Meta-Llama-3-8B-Instruct").kind == "hub"
    assert predict.DEFAULT_MODEL == "smollm2"


@pytest.mark.parametrize("spec, message", [
    ("smolm2", r"model 'smolm2' not found: not a short name \(smollm2, tiny\)"),
    ("/nope/model", r"model '/nope/model' not found"),
    ("", "is empty"),
])
def test_unknown_names_and_missing_paths_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        models.resolve_model(spec)
    assert "\n" not in str(err.value)


def test_a_directory_or_file_that_is_not_a_model(tmp_path):
    with pytest.raises(ValueError, match="is not a model \\(no config.json\\)"):
        models.resolve_model(str(tmp_path))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a .gguf file"):
        models.resolve_model(str(tmp_path / "weights.txt"))


def test_fingerprint_follows_the_weights(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path / "ckpt"))
    before = models.resolve_model(path).fingerprint()
    assert before == models.resolve_model(path).fingerprint()
    with open(os.path.join(path, "config.json"), "a") as f:
        f.write("\n")
    assert models.resolve_model(path).fingerprint() != before
    assert models.resolve_model("org/model").fingerprint() is None


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.load_pretrained(models.resolve_model("smollm2"), torch.float32, "sdpa")
    return model, tokenizer


def test_smollm2_is_the_model_the_issue_describes(smollm2):
    model, tokenizer = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("llama", 30, 9, 3)
    assert c.max_position_embeddings == 8192 and c.tie_word_embeddings and tokenizer.chat_template
    assert getattr(c, "quantization_config", None) is None  # the cached copy is an ordinary fp32 checkpoint
    assert model.dtype == torch.float32


def test_the_cached_copy_equals_the_gguf_load(smollm2):
    from transformers import AutoModelForCausalLM
    model, tokenizer = smollm2
    folder, file = os.path.split(models.smollm2_gguf_path())
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    ids = tokenizer("The grass is green. The sky is blue. " * 8, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_smollm2_fullkv_answers_niah_single_1(smollm2):
    """CI guard: with a full cache the real model answers >= 8 of 10 fixed niah_single_1 prompts."""
    from pyramidkv.ruler import generate_sample
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    correct = 0
    for i in range(10):
        sample = generate_sample("niah_single_1", tokenizer, 1024, i, 42, chat_template=True)
        pred = predict.generate(model, tokenizer, [sample["input"]], 16, "FullKV", {})[0]
        correct += all(answer in pred for answer in sample["outputs"])
    assert correct >= 8, f"only {correct}/10 niah_single_1 answers at 1024 tokens"
