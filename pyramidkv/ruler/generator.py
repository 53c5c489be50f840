"""generate_sample / generate_samples: one RULER sample fitted to a token budget in the target
model's own tokenizer (template + context + question + answer prefix + tokens_to_generate)."""
from __future__ import annotations

import hashlib

from tqdm import tqdm

from . import niah, qa, synthetic
from .niah import DEFAULT_DEPTH_ORDER, DEPTH_ORDERS
from .fitting import assemble, chat_frame, count_tokens, fit_tolerance, fit_units
from .spec import check_task, haystack_choices, task_family
from .spec import tokens_to_generate as default_tokens_to_generate

_BUILDERS = {
    "niah": niah.make_builder,
    "variable_tracking": synthetic.make_vt_builder,
    "common_words_extraction": synthetic.make_cwe_builder,
    "freq_words_extraction": synthetic.make_fwe_builder,
    "qa": qa.make_builder,
}


def sample_seed(task: str, seed: int, index: int) -> int:
    """Stable 64-bit seed for one sample (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"ruler|{task}|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def generate_sample(task: str, tokenizer, max_seq_length: int, index: int, seed: int,
                    chat_template: bool = False, haystack_override: str | None = None,
                    qa_dir: str | None = None, tokens_to_generate: int | None = None,
                    depth_order: str = DEFAULT_DEPTH_ORDER) -> dict:
    """One RULER sample, deterministic in (task, seed, index) for a given tokenizer.

    Returns {"index", "task", "input" (full model input: chat template and answer prefix included),
    "outputs" (answers), "length" (input tokens + tokens_to_generate, <= max_seq_length), "depth"
    (needle depth percent or None), "answer_prefix", "tokens_to_generate", "needles"}; each needle is
    {"key", "value", "is_answer", "depth", "key_span", "value_span"} with character spans into "input"
    (answer needles and distractor needles of niah tasks; the chain assignments of vt, whose "value"
    is the assigned variable and "key" what it is assigned from; empty for cwe, fwe and qa).
    haystack_override replaces the task's haystack (noise | essay | needle; niah and vt only).
    tokens_to_generate overrides RULER's per-task value (e.g. short answers when training).
    depth_order ("spread" | "sequential", pyramidkv.ruler.niah) picks the answer needle's depth for index.
    """
    check_task(task)
    if depth_order not in DEPTH_ORDERS:
        raise ValueError(f"depth_order {depth_order!r} unknown; choose from: {', '.join(DEPTH_ORDERS)}")
    family = task_family(task)
    if haystack_override is not None:
        allowed = haystack_choices(task)
        if haystack_override not in allowed:
            raise ValueError(f"haystack_override {haystack_override!r} not valid for {task}; "
                             f"choose from: {', '.join(allowed) or 'none (niah and vt only)'}")
    max_seq_length = int(max_seq_length)
    to_generate = default_tokens_to_generate(task) if tokens_to_generate is None else int(tokens_to_generate)
    if to_generate < 0:
        raise ValueError(f"tokens_to_generate must be >= 0, got {to_generate}")
    budget = max_seq_length - to_generate
    frame = chat_frame(tokenizer, chat_template)
    rng_seed = sample_seed(task, seed, index)
    context = {"tokenizer": tokenizer, "frame": frame, "max_seq_length": max_seq_length, "budget": budget,
               "haystack": haystack_override, "qa_dir": qa_dir, "depth_order": depth_order}
    build, n_min = _BUILDERS[family](task, rng_seed, index, context)

    def measure(n: int, fill: int = 0):
        built = build(n, fill) if fill else build(n)
        text, needles = assemble(built, frame)
        return count_tokens(tokenizer, text), (built, text, needles)

    what = f"{task} at {max_seq_length} tokens"
    n, count, payload = fit_units(measure, budget, n_min, what)
    if getattr(build, "fillable", False) and budget - count > fit_tolerance(budget):
        _, count, payload = fit_units(lambda fill: measure(n, fill), budget, 0, what)
    built, text, needles = payload
    return {
        "index": index,
        "task": task,
        "input": text,
        "outputs": built.outputs,
        "length": count + to_generate,
        "depth": built.depth,
        "answer_prefix": built.answer_prefix,
        "tokens_to_generate": to_generate,
        "needles": needles,
    }


def generate_samples(task: str, tokenizer, max_seq_length: int, num_samples: int, seed: int,
                     chat_template: bool = False, haystack_override: str | None = None,
                     qa_dir: str | None = None, tokens_to_generate: int | None = None,
                     start_index: int = 0, progress: bool = False,
                     depth_order: str = DEFAULT_DEPTH_ORDER) -> list[dict]:
    """Samples start_index .. start_index + num_samples - 1 (each as generate_sample would give)."""
    indices = range(start_index, start_index + num_samples)
    if progress:
        indices = tqdm(indices, desc=f"generate {task}@{max_seq_length}", unit="sample")
    return [generate_sample(task, tokenizer, max_seq_length, i, seed, chat_template=chat_template,
                            haystack_override=haystack_override, qa_dir=qa_dir,
                            tokens_to_generate=tokens_to_generate, depth_order=depth_order) for i in indices]
