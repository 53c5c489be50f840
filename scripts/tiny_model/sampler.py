"""Training samples: the project's RULER generator when importable, else a minimal fallback.

Both paths return the generator's dict ({"input", "outputs", "needles": [{"key", "value", "key_span",
"value_span", "is_answer"}], ...}); `pack_sample` turns one into token ids, answer targets and the
attention-supervision targets (char spans -> token positions via the fast tokenizer's offsets).
The fallback follows RULER's niah template (task_templates.json, NVIDIA/RULER, Apache-2.0); it is only
used while pyramidkv.ruler is not available, and the training log says which source was used.
"""
from __future__ import annotations

import random
import re
import uuid

from .tokenizer import NOISE, _wonderwords_lists

NIAH_TASKS = {  # RULER synthetic.yaml settings of the niah tasks (haystack, key type, value type, k, v, q)
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}
TEMPLATE = ("Some special magic {v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {v} afterwards.\n{context}\n"
            "What are all the special magic {v} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {v} for {key} is: {value}."

_cache: dict = {}


def _essay_sentences() -> list[str]:
    if "essay" not in _cache:
        from pydoc_data.topics import topics
        text = " ".join(" ".join(v.split()) for v in topics.values())
        _cache["essay"] = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    return _cache["essay"]


def _rand_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _rand_key(rng: random.Random, kind: str) -> str:
    if kind == "uuids":
        return _rand_value(rng, "uuids")
    adjs, nouns = _cache.setdefault("words", _wonderwords_lists())
    return f"{rng.choice(adjs)}-{rng.choice(nouns)}"


def fallback_sample(task: str, tokenizer, max_seq_length: int, index: int, seed: int) -> dict:
    """A niah sample of about max_seq_length tokens (input + 128 generated, as RULER counts)."""
    hay, kkind, vkind, nk, nv, nq = NIAH_TASKS[task]
    nk = max(nk, nq)  # RULER asks each query key once, so there are at least num_needle_q keys
    rng = random.Random(f"{seed}-{task}-{index}")
    keys = []
    while len(keys) < nk:
        k = _rand_key(rng, kkind)
        if k not in keys:
            keys.append(k)
    needles = [(k, _rand_value(rng, vkind)) for k in keys for _ in range(nv)]
    rng.shuffle(needles)
    qkeys = rng.sample(keys, nq)
    query = qkeys[0] if nq == 1 else ", ".join(qkeys[:-1]) + ", and " + qkeys[-1]
    budget = max_seq_length - 128 - len(tokenizer(TEMPLATE.format(v=vkind, context="", query=query)
                                                  + ANSWER_PREFIX.format(v=vkind, query=query)).input_ids)
    budget -= sum(len(tokenizer(NEEDLE.format(v=vkind, key=k, value=v)).input_ids) for k, v in needles)
    hay_sents, used = [], 0
    if hay == "noise":
        per = len(tokenizer(NOISE).input_ids) - 1
        reps = max(1, budget // per)
        hay_sents = (NOISE.strip().split(". ") * reps)
        hay_sents = [s if s.endswith(".") else s + "." for s in hay_sents]
    else:
        pool = _essay_sentences()
        i = rng.randrange(len(pool))
        while used < budget:
            if hay == "essay":
                s = pool[i % len(pool)]
                i += 1
            else:  # haystack of distractor needles with other keys
                k = _rand_key(rng, kkind)
                if k in keys:
                    continue
                s = NEEDLE.format(v=vkind, key=k, value=_rand_value(rng, vkind))
            n = len(tokenizer(s).input_ids)
            if used + n > budget:
                break
            hay_sents.append(s)
            used += n
    slots = sorted(rng.randint(0, len(hay_sents)) for _ in needles)
    for off, (pos, (k, v)) in enumerate(zip(slots, needles)):
        hay_sents.insert(pos + off, NEEDLE.format(v=vkind, key=k, value=v))
    context = " ".join(hay_sents) if hay != "needle" else "\n".join(hay_sents)
    text = TEMPLATE.format(v=vkind, context=context, query=query) + ANSWER_PREFIX.format(v=vkind, query=query)
    out, cursor = [], 0
    for k, v in needles:
        sent = NEEDLE.format(v=vkind, key=k, value=v)
        c0 = text.index(sent, cursor)
        cursor = c0 + len(sent)
        k0 = c0 + sent.index(" for ") + 5
        v0 = c0 + sent.index(" is: ") + 5
        out.append({"key": k, "value": v, "key_span": (k0, k0 + len(k)), "value_span": (v0, v0 + len(v)),
                    "is_answer": k in qkeys})
    answers = [v for q in qkeys for k, v in needles if k == q]
    return {"input": text, "outputs": answers, "needles": out, "length": None, "source": "fallback"}


FAILURES = {"count": 0}


def get_sampler():
    """generate_sample from pyramidkv.ruler if it imports, else the fallback; plus its name.

    The generator is guarded per sample: if a call raises (it was still being written while the model
    trained), that one sample comes from the fallback and FAILURES["count"] goes up (it is logged).
    """
    try:
        from pyramidkv.ruler import generate_sample
    except Exception:  # not landed yet (or broken): keep training on the template-exact fallback
        return fallback_sample, "fallback"

    def guarded(task, tokenizer, max_seq_length, index, seed):
        try:
            # the grid order the embedded checkpoint was trained on (pyramidkv.ruler.niah.DEPTH_ORDERS)
            return generate_sample(task, tokenizer, max_seq_length, index, seed, depth_order="sequential")
        except Exception:
            FAILURES["count"] += 1
            return fallback_sample(task, tokenizer, max_seq_length, index, seed)
    return guarded, "pyramidkv.ruler"
