"""The diagnosis tool behind MODEL_CARD.md / README claims, on the committed checkpoint: its layer-1 copy
heads look at the asked needle's digits, and those digits' layer-1 keys have among the highest norms
(why L2Norm, which keeps the lowest-norm keys, scores 0 on this model)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.tiny_model import diagnose  # noqa: E402

CKPT = os.path.join(ROOT, "ckpt", "pyramidkv-tiny-llama")


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from pyramidkv.ruler import generate_sample
    tok = AutoTokenizer.from_pretrained(CKPT)
    model = AutoModelForCausalLM.from_pretrained(CKPT, attn_implementation="eager").eval()
    samples = [generate_sample("niah_multikey_1", tok, 512, i, 42) for i in range(3)]
    return model, tok, samples


def test_copy_heads_attend_to_the_asked_needle(setup):
    model, tok, samples = setup
    stats = diagnose.copy_attention(model, tok, samples, heads=[0, 4])
    n_tokens = sum(n for n, _, _ in stats.values())
    assert n_tokens == 2 * sum(len(tok.tokenize(s["outputs"][0])) for s in samples)  # two heads, every value token
    for head in (0, 4):
        n, right, others = stats[(head, "right")]
        assert right > 0.8 and others < 0.2, (head, right, others)


def test_needle_keys_have_high_norms_in_layer_1(setup):
    model, tok, samples = setup
    ranks = diagnose.key_norms(model, tok, samples)
    for h in range(model.config.num_key_value_heads):
        rank, n_tokens = ranks[(1, h)]
        assert rank > 0.9 * n_tokens, (h, rank, n_tokens)
