"""Token counting, prompt assembly and the haystack-size search shared by all RULER tasks."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

_SENTINEL = "\x00RULER_TASK\x00"


@dataclass
class Built:
    """One task instance before the model template: text, answers and needle spans inside text."""
    text: str
    answer_prefix: str
    outputs: list[str]
    needles: list[dict] = field(default_factory=list)  # spans relative to `text`
    depth: int | None = None


def join_tracked(pieces: list[tuple[str, dict | None]], sep: str) -> tuple[str, list[tuple[int, dict]]]:
    """Join (text, tag) pieces with sep; return the text and (start offset, tag) of tagged pieces."""
    parts, marks, pos = [], [], 0
    for i, (text, tag) in enumerate(pieces):
        if i:
            parts.append(sep)
            pos += len(sep)
        if tag is not None:
            marks.append((pos, tag))
        parts.append(text)
        pos += len(text)
    return "".join(parts), marks


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the model sees for `text`, counted exactly as pyramidkv.predict.generate tokenizes it:
    special tokens are added unless the text already starts with the BOS token (chat templates)."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return len(tokenizer(text, add_special_tokens=add_special)["input_ids"])


@functools.lru_cache(maxsize=32)
def _chat_frame(tokenizer, template: str) -> tuple[str, str]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    if rendered.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not keep the user message verbatim")
    prefix, suffix = rendered.split(_SENTINEL)
    return prefix, suffix


def chat_frame(tokenizer, chat_template: bool) -> tuple[str, str]:
    """(text before, text after) the user message in the model's chat template; ('', '') if off."""
    if not chat_template:
        return "", ""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("chat_template=True but the tokenizer has no chat template; use chat_template=False")
    if not isinstance(template, str):  # a dict of named templates: let transformers pick the default
        template = None
    try:
        return _chat_frame(tokenizer, template)
    except TypeError:  # unhashable tokenizer object: render without the cache
        return _chat_frame.__wrapped__(tokenizer, template)


def assemble(built: Built, frame: tuple[str, str]) -> tuple[str, list[dict]]:
    """Full model input = chat prefix + task text + chat suffix + answer prefix; needle spans shifted."""
    prefix, suffix = frame
    text = prefix + built.text + suffix + built.answer_prefix
    shift = len(prefix)
    needles = []
    for needle in built.needles:
        moved = dict(needle)
        moved["key_span"] = (needle["key_span"][0] + shift, needle["key_span"][1] + shift)
        moved["value_span"] = (needle["value_span"][0] + shift, needle["value_span"][1] + shift)
        needles.append(moved)
    return text, needles


def fit_tolerance(budget: int) -> int:
    """How far below the budget a fitted instance may stay (0.5 %, at least 2 tokens)."""
    return max(2, budget // 200)


def fit_units(measure: Callable[[int], tuple[int, object]], budget: int, n_min: int, what: str):
    """Largest haystack size n (within a small tolerance) with measure(n)[0] <= budget.

    measure(n) -> (token count, payload). Counts grow almost linearly with n, so each next size is
    interpolated from two real tokenizations (the tightest fitting / non-fitting pair once both are
    known, a secant from the smallest size before), aiming half a tolerance below the budget;
    bisection takes over if interpolation stalls. Typically 2-4 full-length tokenizations.
    Returns (n, count, payload) of the best fitting size.
    """
    count_min, payload_min = measure(n_min)
    if count_min > budget:
        raise ValueError(f"{what}: max_seq_length too small, the smallest instance needs "
                         f"{count_min} input tokens but only {budget} are available")
    tolerance = fit_tolerance(budget)
    target = budget - tolerance // 2
    lo = (n_min, count_min, payload_min)  # best fitting size so far
    hi = None                             # smallest non-fitting size so far: (n, count)
    last = lo
    n = n_min + 8  # cheap probe for the first slope
    for _ in range(60):
        count, payload = measure(n)
        if count <= budget:
            lo = max(lo, (n, count, payload), key=lambda t: t[0])
        elif hi is None or n < hi[0]:
            hi = (n, count)
        if budget - lo[1] <= tolerance or (hi is not None and hi[0] - lo[0] <= 1):
            break
        # interpolate between the bracketing pair, or extrapolate from the last two points
        a, b = (lo, hi) if hi is not None else (last, (n, count))
        last = (n, count, payload)
        slope = (b[1] - a[1]) / (b[0] - a[0]) if b[0] != a[0] else 0.0
        n = a[0] + int((target - a[1]) / slope) if slope > 0 else 2 * n + 1
        if n <= lo[0]:
            n = lo[0] + 1
        if hi is not None and n >= hi[0]:
            n = (lo[0] + hi[0]) // 2
    return lo
