"""Pre-generated RULER data on disk: {data_dir}/{length}/{task}.jsonl plus {task}.meta.json."""
from __future__ import annotations

import json
import os
import platform
import time

from . import haystacks
from .generator import generate_samples
from .niah import DEFAULT_DEPTH_ORDER

REQUIRED_FIELDS = ("index", "input", "outputs", "length")


def dataset_path(data_dir: str, length: int, task: str) -> str:
    return os.path.join(data_dir, str(length), f"{task}.jsonl")


def write_dataset(data_dir: str, task: str, tokenizer, length: int, num_samples: int, seed: int,
                  chat_template: bool, tokenizer_name: str, haystack_override: str | None = None,
                  qa_dir: str | None = None, progress: bool = True,
                  depth_order: str = DEFAULT_DEPTH_ORDER) -> tuple[str, float]:
    """Generate num_samples samples and write them atomically; returns (path, seconds taken)."""
    path = dataset_path(data_dir, length, task)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    start = time.perf_counter()
    samples = generate_samples(task, tokenizer, length, num_samples, seed, chat_template=chat_template,
                               haystack_override=haystack_override, qa_dir=qa_dir, progress=progress,
                               depth_order=depth_order)
    seconds = time.perf_counter() - start
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    meta = {"task": task, "max_seq_length": length, "num_samples": num_samples, "seed": seed,
            "tokenizer": tokenizer_name, "chat_template": chat_template,
            "haystack_override": haystack_override, "depth_order": depth_order, "essay_source": haystacks.ESSAY_SOURCE,
            "python": platform.python_version(), "generation_seconds": round(seconds, 3)}
    with open(path[:-len(".jsonl")] + ".meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return path, seconds


def read_dataset(path: str) -> list[dict]:
    """Samples of one pre-generated file; a malformed line is reported as path:line."""
    from ..result_files import read_jsonl_strict

    return read_jsonl_strict(path, REQUIRED_FIELDS, "RULER sample")


def read_meta(path: str) -> dict | None:
    meta_path = path[:-len(".jsonl")] + ".meta.json"
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        from ..predict import CLIError
        raise CLIError(f"{meta_path} is not readable JSON ({err}); regenerate the data with "
                       "python -m pyramidkv.ruler") from None
    return meta if isinstance(meta, dict) else None
