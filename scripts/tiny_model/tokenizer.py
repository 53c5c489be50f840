"""Build the tiny model's tokenizer: a byte-level BPE whose numbers split into fixed digit groups.

Byte-level means every UTF-8 string is encodable (no unknown characters, no crash on odd text).
Numbers are split into groups of up to `digits_per_token` digits from the left (1: one digit per token;
2: the embedded checkpoint's; 3: Llama-3's `\\p{N}{1,3}` rule), every group one token, so that numbers in
the haystack and in the answer tokenize identically (the copy the model must learn is token-for-token).
"""
from __future__ import annotations

import os
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Prompts are used raw (RULER "base" template). The chat template only concatenates the messages, so a
# runner that applies it gets the same text as a base prompt (BOS is added by the tokenizer itself).
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def _wonderwords_lists() -> tuple[list[str], list[str]]:
    import wonderwords
    base = os.path.join(os.path.dirname(wonderwords.__file__), "assets")
    read = lambda name: [w.strip() for w in open(os.path.join(base, name), encoding="utf-8") if w.strip()]
    return read("adjectivelist.txt"), read("nounlist.txt")


def training_corpus(seed: int = 0) -> list[str]:
    """Text the BPE merges are learned from: everything the RULER generator emits."""
    import json
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    adjs, nouns = _wonderwords_lists()
    texts = [NOISE * 20]
    texts += list(topics.values())  # essay haystack source (Python docs, public text shipped with Python)
    texts += [" ".join(f"{rng.choice(adjs)}-{rng.choice(nouns)}" for _ in range(50)) for _ in range(100)]
    texts += [" ".join(adjs), " ".join(nouns)]
    here = os.path.dirname(os.path.abspath(__file__))
    tpl_path = os.path.join(here, "..", "..", "pyramidkv", "reference", "ruler", "task_templates.json")
    if not os.path.exists(tpl_path):
        tpl_path = "/work/shared/reference/ruler/task_templates.json"
    if os.path.exists(tpl_path):
        tasks = json.load(open(tpl_path))["tasks"]
        for t in tasks.values():
            texts += [t["template"] * 5, t["answer_prefix"] * 5]
    texts += [" ".join("VAR " + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
                       for _ in range(200))]
    return texts


def key_words() -> list[str]:
    """The words the RULER generator builds needle keys from (its adjective and noun lists), letters only."""
    from pyramidkv.ruler.haystacks import word_lists
    lists = word_lists()
    return sorted({w for w in lists["adjective"] + lists["noun"] if w.isalpha() and w.isascii()})


def digit_groups(digits_per_token: int) -> list[str]:
    """Every digit string of 2..digits_per_token digits: each must be one token."""
    from itertools import product
    return ["".join(p) for n in range(2, digits_per_token + 1) for p in product("0123456789", repeat=n)]


def build_tokenizer(vocab_size: int = 2048, seed: int = 0, whole_key_words: bool = False,
                    digits_per_token: int = 2):
    """Train the BPE and wrap it as a transformers fast tokenizer (BOS prepended, EOS appended never).

    digits_per_token > 1: numbers split into groups of that many digits from the left (the last group
    shorter), each group one token; the vocabulary grows by one entry per group string, so the word merges
    are those of the 1-digit tokenizer. Why: with one digit per token the copy of a 7-digit value must
    re-find the queried needle at every digit among ~28 needles' same-position digits (MODEL_CARD history);
    with pairs a value is 4 tokens and a wrong needle's attention mass spreads over up to 100 different
    tokens instead of 10. Three-digit groups learned far slower (MODEL_CARD history).

    whole_key_words (off in the recipe): every key word is one token (an added token that only matches a
    whole word, so "cat" stays inside "concatenate"). With the 2 048-entry BPE alone a key like
    reflective-compulsion was 7 pieces, often shared between keys (re, c, s ...): the layer-0 heads
    that must tell 28 keys apart in niah_multikey_2 saw overlapping bags of pieces. Measured: it did
    NOT help (4 000 steps from scratch never passed the first curriculum gate; MODEL_CARD.md), so the
    recipe keeps it off.
    """
    from transformers import PreTrainedTokenizerFast

    if digits_per_token < 1:
        raise ValueError(f"digits_per_token={digits_per_token}: must be >= 1")
    tok = Tokenizer(models.BPE())
    digits = (pre_tokenizers.Digits(individual_digits=True) if digits_per_token == 1 else
              pre_tokenizers.Split(Regex(rf"\d{{1,{digits_per_token}}}"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    groups = digit_groups(digits_per_token)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(groups), special_tokens=[BOS, EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # each group repeated far more often than the rarest word merge, so all groups are merged first-class
    corpus = training_corpus(seed) + ([" ".join(groups * 200)] if groups else [])
    tok.train_from_iterator(corpus, trainer=trainer)
    split = [g for g in groups if len(tok.encode(g).ids) != 1]
    if split:
        raise RuntimeError(f"{len(split)} digit groups are not single tokens, e.g. {split[:3]}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    if whole_key_words:
        fast.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in key_words()])
    return fast
