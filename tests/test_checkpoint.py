"""CI guard on the committed default checkpoint, the RULER generator and generation together:
with a full cache the tiny model must answer >= 8 of 10 fixed niah_single_1 samples at 512 tokens."""
import os

import pytest
import torch

CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ckpt", "pyramidkv-tiny-llama")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(CKPT).eval(), AutoTokenizer.from_pretrained(CKPT)


def test_checkpoint_loads_like_a_real_one(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = tok("odd text: é 中文 \x00 0123456789").input_ids  # byte-level: nothing is unknown
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True).startswith("odd text")


def test_fullkv_answers_niah_single_1(model_and_tokenizer):
    from pyramidkv.ruler import generate_sample
    model, tok = model_and_tokenizer
    correct = 0
    for i in range(10):
        s = generate_sample("niah_single_1", tok, 512, i, 42)
        enc = tok(s["input"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        pred = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        correct += all(a in pred for a in s["outputs"])
    assert correct >= 8, f"only {correct}/10 niah_single_1 answers at 512 tokens"
