"""Needle-in-a-haystack tasks (niah_single_*, niah_multikey_*, niah_multivalue, niah_multiquery).

Recipe of RULER (Hsieh et al., 2024, arXiv:2404.06654, Sec. 3.1): needles "One of the special magic
{numbers|uuids} for {key} is: {value}." are placed at depths in a noise, essay or needle haystack;
multikey adds distractor keys, multivalue several values per key, multiquery several queried keys.
Depths come from RULER's 40-point grid (0..100 %); other needles take random grid points, as in RULER.
RULER draws the answer needle's depth at random too; here sample i takes grid point DEPTH_ORDERS[order][i
mod 40], so every 40 consecutive samples cover each depth once (the needle heatmap's rows) and, with the
default "spread" order, the first n samples are spread over the whole context (10 samples: depths 0, 82,
41, 21, 62, 10, 92, 51, 31, 72), where "sequential" (grid order; tables made before 2026-12-02) puts the
first 10 at depths 0..23 %, which a 10-sample table would read as a property of the method.
"""
from __future__ import annotations

from random import Random

from . import haystacks
from .fitting import Built, join_tracked
from .spec import task_args, task_template

DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))


def _bit_reversed_grid(n: int) -> list[int]:
    """0..n-1 in bit-reversed order (van der Corput): every prefix is spread over the whole range."""
    bits = max(1, (n - 1).bit_length())
    reversed_ = (int(format(i, f"0{bits}b")[::-1], 2) for i in range(2 ** bits))
    return [i for i in reversed_ if i < n]


DEPTH_ORDERS = {"spread": _bit_reversed_grid(len(DEPTHS)), "sequential": list(range(len(DEPTHS)))}
DEFAULT_DEPTH_ORDER = "spread"


def lead_depth(index: int, order: str = DEFAULT_DEPTH_ORDER) -> int:
    """Depth (percent) of sample index's answer needle under a depth order."""
    if order not in DEPTH_ORDERS:
        raise ValueError(f"depth order {order!r} unknown; choose from: {', '.join(DEPTH_ORDERS)}")
    return DEPTHS[DEPTH_ORDERS[order][index % len(DEPTHS)]]


def _needle(type_needle_v: str, key: str, value: str) -> tuple[str, int, int]:
    """Needle sentence and the offsets of its key and value."""
    head = f"One of the special magic {type_needle_v} for "
    key_start = len(head)
    value_start = key_start + len(key) + len(" is: ")
    text = haystacks.NEEDLE.format(type_needle_v=type_needle_v, key=key, value=value)
    return text, key_start, value_start


def _singular(text: str) -> str:
    # RULER's rewrite of the template when exactly one value is asked for
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def make_builder(task: str, sample_seed: int, index: int, ctx: dict):
    """build(n) for n haystack units (essay words, noise paragraphs or distractor needles), n_min."""
    args = task_args(task)
    type_haystack = ctx.get("haystack") or args["type_haystack"]
    type_k, type_v = args["type_needle_k"], args["type_needle_v"]
    num_v, num_q = args["num_needle_v"], args["num_needle_q"]
    num_k = max(args["num_needle_k"], num_q)  # RULER: every queried key needs its own needle
    rng = Random(sample_seed)
    forbidden = haystacks.essay_text() if type_haystack == "essay" else haystacks.NOISE
    taken: set = set()
    keys = haystacks.unique_values(type_k, rng, num_k, taken, forbidden)
    values = [haystacks.unique_values(type_v, rng, num_v, taken, forbidden) for _ in keys]
    queried = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in queried]
    answers = [v for i in queried for v in values[i]]

    needles = [{"key": k, "value": v, "is_answer": k in queries} for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    lead = next(i for i, n in enumerate(needles) if n["value"] == answers[0])
    answer_depth = lead_depth(index, ctx.get("depth_order") or DEFAULT_DEPTH_ORDER)
    others = rng.sample([d for d in DEPTHS if d != answer_depth], len(needles) - 1)
    for i, needle in enumerate(needles):
        needle["depth"] = answer_depth if i == lead else others.pop()

    distractors: list[tuple[str, str]] = []  # needle-haystack sentences, grown on demand
    distractor_rng = Random(sample_seed ^ 0x5EED)

    query = queries[0] if num_q == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    spec = task_template(task)
    template, answer_prefix, type_q = spec["template"], spec["answer_prefix"], type_v
    if num_q * num_v == 1:
        template, answer_prefix, type_q = _singular(template), _singular(answer_prefix), type_v[:-1]
    pre, post = template.split("{context}")
    pre = pre.format(type_needle_v=type_q)
    post = post.format(type_needle_v=type_q, query=query)
    answer_prefix = answer_prefix.format(type_needle_v=type_q, query=query)

    def needle_piece(needle: dict) -> tuple[str, dict]:
        text, key_off, value_off = _needle(type_v, needle["key"], needle["value"])
        return text, dict(needle, key_off=key_off, value_off=value_off)

    def build(n: int, fill: int = 0) -> Built:
        """n haystack units; `fill` single noise sentences appended after the last unit to close the
        gap to the budget when one unit (a paragraph or needle, 20-80 tokens) is too coarse."""
        if type_haystack == "essay":
            sentences = haystacks.split_sentences(haystacks.essay_prefix(n)) if n else []
            units = [(s, None) for s in sentences]
            sep = " "
        elif type_haystack == "noise":
            units = [(haystacks.NOISE, None)] * n
            sep = "\n"
        else:  # needle haystack: every filler sentence is itself a (distractor) needle
            while len(distractors) < n:
                k = haystacks.unique_values(type_k, distractor_rng, 1, taken)[0]
                v = haystacks.unique_values(type_v, distractor_rng, 1, taken)[0]
                distractors.append((k, v))
            units = [needle_piece({"key": k, "value": v, "is_answer": False, "depth": None})
                     for k, v in distractors[:n]]
            sep = "\n"
        # insert deepest first so earlier insertion points keep their index
        size = len(units)
        for needle in sorted(needles, key=lambda x: x["depth"], reverse=True):
            units.insert(int(size * needle["depth"] / 100), needle_piece(needle))
        if fill:
            units.append((" ".join(haystacks.NOISE_SENTENCES[i % 5] for i in range(fill)), None))
        context, marks = join_tracked(units, sep)
        base = len(pre)
        spans = []
        for start, needle in marks:
            key_start = base + start + needle["key_off"]
            value_start = base + start + needle["value_off"]
            spans.append({"key": needle["key"], "value": needle["value"], "is_answer": needle["is_answer"],
                          "depth": needle["depth"],
                          "key_span": (key_start, key_start + len(needle["key"])),
                          "value_span": (value_start, value_start + len(needle["value"]))})
        return Built(pre + context + post, answer_prefix, list(answers), spans, answer_depth)

    build.fillable = type_haystack != "essay"
    return build, 0
