"""Turn a RULER niah sample into training tensors: ids, answer targets, attention-supervision targets.

Supervision (DESIGN §5, probe 2): we know where every needle is, so two heads are told where to look:
- layer 0, heads 0 and 1: from each needle's value tokens, and from every answer position, to the key's
  first word (head 0: the adjective, or a uuid's first group) and last word (head 1: the noun, or the
  last group) — the needle's own key; for answers, the query key's last mention (answer prefix).
  Two heads on the two words, not one on the whole key: one head on the whole key settled on the "-"
  shared by every key, which says nothing about which key it is (multi-key accuracy stalled at ~0.3);
- layer 1, head 0: from the position that predicts answer token m to value token m of the queried needle;
- optionally (`--prev_heads`) layer-0 heads from every value token to the token before it.
This spells out the induction-style circuit (key binding, then key-matched copy) the model must form.
"""
from __future__ import annotations

import random
import re

NEEDLE_RE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")
QUESTION = " What are all the special magic {v} for {key} mentioned in the provided text?"
PREFIX = " The special magic {v} for {key} mentioned in the provided text are"


def _tokens_in(offsets, c0: int, c1: int, base: int = 0) -> list[int]:
    return [base + i for i, (a, b) in enumerate(offsets) if b > a and a < c1 and b > c0]


def _key_parts(offsets, c0: int, key: str, base: int = 0) -> tuple[list[int], list[int]]:
    """Token positions of the key's first and last hyphen-separated parts (the whole key if no '-')."""
    first_end = key.find("-") if "-" in key else len(key)
    last_start = key.rfind("-") + 1
    return (_tokens_in(offsets, c0, c0 + first_end, base),
            _tokens_in(offsets, c0 + last_start, c0 + len(key), base))


def _answer_block(tok, text_ids_len, values, key_pos_of_value, value_tok_of_value, prefix_ids=None):
    """Token ids for ' v1, v2' + EOS, with targets and supervision rows, starting at text_ids_len."""
    text = " " + ", ".join(values)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids) + [tok.eos_token_id]
    targets, l0, l1 = [], [], []
    cursor = 1
    first_pred = text_ids_len - 1  # the last prompt token predicts the first answer token
    for j, v in enumerate(values):
        c0 = text.index(v, cursor)
        cursor = c0 + len(v)
        toks = _tokens_in(enc.offset_mapping, c0, c0 + len(v))
        src = value_tok_of_value[j]
        same = src is not None and len(src) == len(toks)
        for m, t in enumerate(toks):
            pred = first_pred + t  # position whose next token is answer token t
            if same:
                l1.append((pred, [src[m]]))
            if key_pos_of_value[j] and key_pos_of_value[j][0] and key_pos_of_value[j][1]:
                l0.append((pred, *key_pos_of_value[j]))
    for t in range(len(ids)):
        targets.append((first_pred + t, ids[t]))
    return ids, targets, l0, l1


def pack_sample(sample: dict, tok, rng: random.Random, max_questions: int = 8) -> dict:
    """ids, answer targets [(pos, id)], first-question value positions, and supervision rows."""
    text = sample["input"]
    enc = tok(text, return_offsets_mapping=True)
    ids, offs = list(enc.input_ids), enc.offset_mapping
    needles = []  # every needle-shaped sentence of the prompt, including needle-haystack distractors
    for m in NEEDLE_RE.finditer(text):
        needles.append({"kind": m.group(1), "key": m.group(2), "value": m.group(3),
                        "key_tok": _key_parts(offs, m.start(2), m.group(2)), "val_tok": _tokens_in(offs, *m.span(3))})
    l0 = [(p, *n["key_tok"]) for n in needles for p in n["val_tok"] if all(n["key_tok"])]
    l1 = []
    by_value = {n["value"]: n for n in needles}
    values = list(sample["outputs"])
    # query keys of the first question: the needle holding each answer value
    qkeys = [by_value[v]["key"] if v in by_value else None for v in values]
    def last_mention(key):
        if key is None:
            return []
        c0 = text.rfind(key)
        return _key_parts(offs, c0, key)
    key_pos = [last_mention(k) for k in qkeys]
    val_tok = [by_value[v]["val_tok"] if v in by_value else None for v in values]
    a_ids, targets, a0, a1 = _answer_block(tok, len(ids), values, key_pos, val_tok)
    first_answer = [(p, t) for p, t in targets[:-1]]  # value tokens of the eval-format question (no EOS)
    ids += a_ids
    l0 += a0
    l1 += a1
    # more questions on other needles whose key is unique (cheap extra answers per long sequence)
    counts: dict = {}
    for n in needles:
        counts[n["key"]] = counts.get(n["key"], 0) + 1
    askable = [n for n in needles if counts[n["key"]] == 1 and n["key"] not in qkeys]
    rng.shuffle(askable)
    for n in askable[: rng.randint(0, max_questions - 1)]:
        q = QUESTION.format(v=n["kind"], key=n["key"]) + PREFIX.format(v=n["kind"], key=n["key"])
        qenc = tok(q, add_special_tokens=False, return_offsets_mapping=True)
        c0 = q.rfind(n["key"])
        kpos = _key_parts(qenc.offset_mapping, c0, n["key"], base=len(ids))
        ids += list(qenc.input_ids)
        b_ids, b_t, b0, b1 = _answer_block(tok, len(ids), [n["value"]], [kpos], [n["val_tok"]])
        ids += b_ids
        targets += b_t
        l0 += b0
        l1 += b1
    # every needle's value tokens, for an optional previous-token head (a value digit's predecessor is the
    # digit an answer has just emitted: matching it tells same-position digits of other needles apart)
    val_pos = [q for n in needles for q in n["val_tok"]]
    return {"ids": ids, "targets": targets, "first": first_answer, "l0": l0, "l1": l1, "val_pos": val_pos}
