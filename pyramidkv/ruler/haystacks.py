"""Offline haystacks and random needles for the RULER generator.

- noise: RULER's repeated filler paragraph.
- essay: RULER uses Paul Graham's essays (downloaded). Here the prose comes from Python's own
  documentation (`pydoc_data.topics`, part of every CPython install, PSF license), cleaned down to its
  running-text paragraphs, so generation needs no download and no extra package. The text depends
  on the Python minor version; generation metadata records it.
- needle: a haystack made of needle sentences with random keys and values (distractors).
- word lists: PyPI `wonderwords` (nouns, adjectives, verbs), as RULER does.
"""
from __future__ import annotations

import functools
import re
import string
import sys
import uuid
from random import Random

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = [s + "." for s in NOISE[:-1].split(". ")]
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
ESSAY_SOURCE = f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor})"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentence split without nltk data: break after . ! ? followed by space and a capital/digit."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _is_prose_line(line: str) -> bool:
    stripped = line.strip()
    if not stripped or line[:1].isspace():  # indented lines are code, grammar or tables
        return False
    if set(stripped) <= set("*=-~^+|"):  # heading underlines, table rules
        return False
    return True


@functools.lru_cache(maxsize=1)
def essay_text() -> str:
    """Running prose of the Python reference documentation, one space between words."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        block: list[str] = []
        for line in topics[name].splitlines() + [""]:
            if _is_prose_line(line):
                block.append(line.strip())
                continue
            paragraph = " ".join(block)
            block = []
            # keep real paragraphs: several words, ending like a sentence
            if len(paragraph.split()) >= 12 and paragraph.endswith((".", "!", "?")):
                paragraphs.append(paragraph)
    return re.sub(r"\s+", " ", " ".join(paragraphs)).strip()


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    return tuple(essay_text().split(" "))


def essay_prefix(num_words: int) -> str:
    """First num_words words of the essay, cycling through it when more are needed (as RULER)."""
    words = essay_words()
    if num_words <= len(words):
        return " ".join(words[:num_words])
    repeats = -(-num_words // len(words))
    return " ".join((words * repeats)[:num_words])


@functools.lru_cache(maxsize=1)
def word_lists() -> dict[str, tuple[str, ...]]:
    from wonderwords.random_word import _get_words_from_text_file as read_list

    return {kind: tuple(sorted(set(read_list(f"{kind}list.txt")))) for kind in ("noun", "adjective", "verb")}


@functools.lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """Distinct single words (nouns + adjectives + verbs), lowercase letters only, for cwe."""
    lists = word_lists()
    pool = set(lists["noun"]) | set(lists["adjective"]) | set(lists["verb"])
    return tuple(sorted(w for w in pool if w.isalpha() and w.islower()))


def random_value(kind: str, rng: Random) -> str:
    """A needle key or value: 'numbers' (7 digits), 'uuids', or 'words' (adjective-noun)."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        lists = word_lists()
        return f"{rng.choice(lists['adjective'])}-{rng.choice(lists['noun'])}"
    raise ValueError(f"unknown needle type {kind!r}; choose from: numbers, uuids, words")


def unique_values(kind: str, rng: Random, count: int, taken: set, forbidden_text: str = "") -> list[str]:
    """count fresh values not in `taken` (updated) and not occurring in forbidden_text."""
    out = []
    while len(out) < count:
        value = random_value(kind, rng)
        if value in taken or (forbidden_text and value in forbidden_text):
            continue
        taken.add(value)
        out.append(value)
    return out


def random_upper(rng: Random, length: int) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=length))
