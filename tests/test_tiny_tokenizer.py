"""The embedded model's tokenizer and training targets: the committed checkpoint's tokenizer is the one
the training script builds; with --whole_key_words every key word is one token and the layer-0
supervision targets land on exactly the needle's key words."""
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from scripts.tiny_model.packing import pack_sample  # noqa: E402
from scripts.tiny_model.tokenizer import build_tokenizer, key_words  # noqa: E402

CKPT = os.path.join(ROOT, "ckpt", "pyramidkv-tiny-llama")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(whole_key_words=True)


def test_key_words_are_one_token_and_only_as_whole_words(tok):
    words = key_words()
    assert len(words) > 7000
    for w in random.Random(0).sample(words, 200):
        pieces = tok.tokenize(f"for {w}-{w} is")
        assert pieces[2] == w and pieces[4] == w, pieces
    # an added word never matches inside a longer word (the BPE alone has no "zucchini" piece)
    assert "zucchini" in words and "zucchini" not in tok.tokenize(" zucchinis")
    text = "One of the special magic numbers for spooky-cot is: 1234567. é 中文"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_committed_tokenizer_is_the_training_scripts():
    from transformers import AutoTokenizer
    committed, rebuilt = AutoTokenizer.from_pretrained(CKPT), build_tokenizer()
    assert len(committed) == len(rebuilt)
    text = "What are all the special magic numbers for reflective-compulsion mentioned? 0123456789 é"
    assert committed(text).input_ids == rebuilt(text).input_ids


def test_supervision_targets_are_the_needle_keys(tok):
    from pyramidkv.ruler import generate_sample
    sample = generate_sample("niah_multikey_2", tok, 512, 3, 10_000)
    packed = pack_sample(sample, tok, random.Random(0))
    ids = packed["ids"]
    keys = {n["key"] for n in sample["needles"]}
    adjectives = {k.split("-")[0] for k in keys}
    nouns = {k.split("-")[-1] for k in keys}
    assert packed["l0"]
    for _, adj_pos, noun_pos in packed["l0"]:
        assert len(adj_pos) == 1 and len(noun_pos) == 1
        assert tok.convert_ids_to_tokens(ids[adj_pos[0]]) in adjectives
        assert tok.convert_ids_to_tokens(ids[noun_pos[0]]) in nouns
    # the eval-format answer is the queried needle's value, digit by digit
    answer = "".join(tok.convert_ids_to_tokens(t) for _, t in packed["first"]).replace("Ġ", "")
    assert answer == sample["outputs"][0]


def test_three_digit_groups_are_single_tokens_and_copy_token_for_token():
    tok3, tok1 = build_tokenizer(digits_per_token=3), build_tokenizer(digits_per_token=1)
    assert len(tok3) == len(tok1) + 1100  # every 2- and 3-digit string, nothing else changed
    assert tok3.tokenize("is: 1234567. 42 7") == tok1.tokenize("is:")[:2] + ["Ġ", "123", "456", "7", ".",
                                                                           "Ġ", "42", "Ġ", "7"]
    words = "The grass is green. reflective-compulsion"
    assert tok3.tokenize(words) == tok1.tokenize(words)  # word merges are the 1-digit tokenizer's
    # a value in the haystack and the same value in an answer are the same tokens
    text = "One of the special magic numbers for spooky-cot is: 9033500. The answer is 9033500"
    ids = tok3(text).input_ids
    first = ids.index(tok3.convert_tokens_to_ids("903"))
    assert ids[-3:] == ids[first:first + 3] == tok3.convert_tokens_to_ids(["903", "350", "0"])
    assert tok3.decode(ids, skip_special_tokens=True) == text
    with pytest.raises(ValueError, match="digits_per_token=0"):
        build_tokenizer(digits_per_token=0)
