"""RULER's multi-hop tracing (vt) and aggregation tasks (cwe, fwe).

Recipes from Hsieh et al., 2024 (arXiv:2404.06654), Sec. 3.2-3.3:
- vt: a chain "VAR X1 = 12345", "VAR X2 = VAR X1", ... hidden in noise; name every variable that
  holds the value. One in-context example (3-letter names) precedes the question, as in RULER.
- cwe: a numbered word list where num_cw common words appear freq_cw times and the rest freq_ucw
  times; name the common ones. One worked example precedes it (smaller settings below 4k tokens).
- fwe: coded words drawn with Zipf frequencies (alpha); the top word is '...' noise; name the next
  three. One worked example precedes it.
"""
from __future__ import annotations

import functools
import math
import string
from random import Random

from . import haystacks
from .fitting import Built, assemble, count_tokens, fit_units, join_tracked
from .spec import task_args, task_template


def _split(template: str) -> tuple[str, str]:
    pre, post = template.split("{context}")
    return pre, post


def _icl_budget(max_seq_length: int) -> int:
    # RULER fits its examples to 500 tokens; short targets get a proportionally smaller example
    return min(500, max_seq_length // 4)


def _fit_example(tokenizer, build, n_min: int, max_seq_length: int, what: str) -> str:
    """The worked example, as large as its budget allows (its smallest form if even that is over)."""
    smallest = build(n_min)
    budget = _icl_budget(max_seq_length)
    if count_tokens(tokenizer, smallest) >= budget:
        return smallest

    def measure(n):
        text = build(n)
        return count_tokens(tokenizer, text), text
    return fit_units(measure, budget, n_min, f"{what} example")[2]


def _noise_units(type_haystack: str, n: int) -> tuple[list[str], str]:
    if type_haystack == "essay":
        return (haystacks.split_sentences(haystacks.essay_prefix(n)) if n else []), " "
    return [haystacks.NOISE] * n, "\n"


# ----------------------------------------------------------------------------- vt

def _vt_instance(rng: Random, num_chains: int, num_hops: int, name_len: int, taken: set):
    """Chains of (statement, key, key offset, value, value offset) and the first chain's names."""
    names = []
    while len(names) < num_chains * (num_hops + 1):
        name = haystacks.random_upper(rng, name_len)
        if name not in taken and name != "VAR":
            taken.add(name)
            names.append(name)
    chains = []
    for c in range(num_chains):
        chain_names = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        number = str(rng.randint(10000, 99999))  # RULER: 5-digit values
        while number in taken:
            number = str(rng.randint(10000, 99999))
        taken.add(number)
        statements, source = [], number
        for name in chain_names:
            rhs = source if source == number else f"VAR {source}"
            text = f"VAR {name} = {rhs}"
            statements.append((text, source, len(text) - len(source), name, 4))
            source = name
        chains.append((number, chain_names, statements))
    return chains


def make_vt_builder(task: str, sample_seed: int, index: int, ctx: dict):
    args = task_args(task)
    num_chains, num_hops = args["num_chains"], args["num_hops"]
    type_haystack = ctx.get("haystack") or args["type_haystack"]
    spec = task_template(task)
    pre, post = _split(spec["template"])
    rng = Random(sample_seed)
    taken: set = set()
    chains = _vt_instance(rng, num_chains, num_hops, 5, taken)
    icl_chains = _vt_instance(rng, num_chains, min(10, num_hops), 3, taken)
    main_fractions = [sorted(rng.random() for _ in chain[2]) for chain in chains]
    icl_fractions = [sorted(rng.random() for _ in chain[2]) for chain in icl_chains]

    def render(chain_set, fractions, n):
        units, sep = _noise_units(type_haystack, n)
        pieces = [(u, None) for u in units]
        inserts = []
        for c, (_, _, statements) in enumerate(chain_set):
            for j, (statement, *rest) in enumerate(statements):
                inserts.append((int(fractions[c][j] * len(units)), c, j, statement, rest))
        for pos, c, j, statement, rest in sorted(inserts, reverse=True):
            pieces.insert(pos, (statement, (c, *rest)))
        context, marks = join_tracked(pieces, sep)
        number, names, _ = chain_set[0]
        hops = len(names)
        text = pre + context + post.format(query=number)
        answer_prefix = spec["answer_prefix"].format(num_v=hops, query=number)
        return text, marks, answer_prefix, names

    def icl_text(n):
        text, _, answer_prefix, names = render(icl_chains, icl_fractions, n)
        return text + answer_prefix + " " + " ".join(names)

    example = _fit_example(ctx["tokenizer"], icl_text, 0, ctx["max_seq_length"], task)
    head = example + "\n\n"

    def build(n: int) -> Built:
        text, marks, answer_prefix, names = render(chains, main_fractions, n)
        needles = []
        for start, (c, key, key_off, value, value_off) in marks:
            base = len(head) + len(pre) + start
            needles.append({"key": key, "value": value, "is_answer": c == 0, "depth": None,
                            "key_span": (base + key_off, base + key_off + len(key)),
                            "value_span": (base + value_off, base + value_off + len(value))})
        return Built(head + text, answer_prefix, list(names), needles, None)

    return build, 0


# ----------------------------------------------------------------------------- cwe

def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe_settings(args: dict, max_seq_length: int) -> list[tuple[int, tuple, tuple]]:
    """(example words, example frequencies, main frequencies), preferred first: RULER's full settings
    from 4096 tokens up, its short-context ones below; then, for tokenizers so verbose that even
    those do not fit (digit-by-digit numbering at 1k), the short settings without the worked example."""
    full = (40, (10, 3), (args["freq_cw"], args["freq_ucw"]))
    short = (20, (3, 1), (6, 1))
    no_example = (0, (0, 0), (6, 1))
    return ([full] if max_seq_length >= 4096 else []) + [short, no_example]


def make_cwe_builder(task: str, sample_seed: int, index: int, ctx: dict):
    args = task_args(task)
    num_cw = args["num_cw"]
    spec = task_template(task)
    pre, post = _split(spec["template"])
    settings = _cwe_settings(args, ctx["max_seq_length"])
    for example_words, example_freq, main_freq in settings:
        rng = Random(sample_seed)
        pool = list(haystacks.common_words())
        rng.shuffle(pool)
        example_pool, main_pool = pool[:example_words], pool[example_words:]
        extra_rng, taken = Random(sample_seed ^ 0xC0FFEE), set(pool)

        def word_list(words, freq, shuffle_seed):
            items = words[:num_cw] * freq[0] + words[num_cw:] * freq[1]
            Random(shuffle_seed).shuffle(items)
            return items

        example = ""
        if example_words:
            example = (pre + _numbered(word_list(example_pool, example_freq, sample_seed + 1)) + post
                       + spec["answer_prefix"] + " " + _numbered(example_pool[:num_cw]) + "\n")

        def build(n: int, main_pool=main_pool, extra_rng=extra_rng, taken=taken, example=example,
                  main_freq=main_freq) -> Built:
            # beyond the word list (128k contexts) fresh adjective-noun compounds extend the vocabulary
            while len(main_pool) < n:
                main_pool.extend(haystacks.unique_values("words", extra_rng, 1, taken))
            words = main_pool[:n]
            items = word_list(words, main_freq, sample_seed + 2 + n)
            text = example + pre + _numbered(items) + post
            return Built(text, spec["answer_prefix"], list(words[:num_cw]), [], None)

        smallest = count_tokens(ctx["tokenizer"], assemble(build(num_cw), ctx["frame"])[0])
        if smallest <= ctx["budget"]:
            break
    return build, num_cw


# ----------------------------------------------------------------------------- fwe

@functools.lru_cache(maxsize=None)
def zeta(s: float, terms: int = 10_000) -> float:
    """Riemann zeta for s > 1: partial sum plus the Euler-Maclaurin tail."""
    partial = math.fsum(k ** -s for k in range(1, terms))
    n = float(terms)
    return partial + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12


def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> list[int]:
    """Occurrences of each rank: int(num_words * k^-alpha / zeta(alpha)), as RULER; ranks below the
    answer ranks (2-4) are capped strictly below rank 4 so the answer is unambiguous for small n."""
    z = zeta(alpha)
    counts = [int(num_words * k ** -alpha / z) for k in range(1, vocab_size + 1)]
    cap = counts[3] - 1
    return counts[:4] + [min(c, max(cap, 0)) for c in counts[4:]]


def _coded_vocab(rng: Random, size: int, length: int, taken: set) -> list[str]:
    vocab = []
    while len(vocab) < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=length))
        if word not in taken:
            taken.add(word)
            vocab.append(word)
    vocab[0] = "..."  # the most frequent "word" is noise
    return vocab


def make_fwe_builder(task: str, sample_seed: int, index: int, ctx: dict):
    alpha = float(task_args(task)["alpha"])
    vocab_size, word_len = 2000, 6
    spec = task_template(task)
    pre, post = _split(spec["template"])
    rng = Random(sample_seed)
    taken: set = set()
    vocab = _coded_vocab(rng, vocab_size, word_len, taken)
    example_vocab = _coded_vocab(rng, vocab_size, word_len, taken)
    # smallest text whose ranks 2-4 all occur
    n_min = next(n for n in range(4, 10_000) if zipf_counts(n, 5, alpha)[3] >= 1)

    def coded_text(n, words, shuffle_seed):
        items = [w for w, c in zip(words, zipf_counts(n, len(words), alpha)) for _ in range(c)]
        Random(shuffle_seed).shuffle(items)
        return pre + " ".join(items) + post

    def example_text(n):
        return coded_text(n, example_vocab, sample_seed + 1 + n) + spec["answer_prefix"] + " " + " ".join(
            example_vocab[1:4])

    example = _fit_example(ctx["tokenizer"], example_text, n_min, ctx["max_seq_length"], task)

    def build(n: int) -> Built:
        text = example + "\n\n" + coded_text(n, vocab, sample_seed + 2 + n)
        return Built(text, spec["answer_prefix"], list(vocab[1:4]), [], None)

    return build, n_min
