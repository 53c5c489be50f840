"""RULER task table: the 13 task configurations and their templates, read from the Apache-2.0 data
files in pyramidkv/reference/ruler/ (NVIDIA/RULER; see the README there).

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?", 2024
(arXiv:2404.06654).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import yaml

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference" / "ruler"

TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe",
    "qa_1", "qa_2",
)
# qa_1/qa_2 need SQuAD / HotpotQA files placed by the user; everything else is generated offline.
DEFAULT_TASKS = TASKS[:11]

HAYSTACKS = ("noise", "essay", "needle")


@functools.lru_cache(maxsize=None)
def task_configs() -> dict:
    """{task: {"task": family, "args": {...}}} from synthetic.yaml."""
    with open(REFERENCE_DIR / "synthetic.yaml", encoding="utf-8") as f:
        configs = yaml.safe_load(f)
    missing = set(TASKS) - set(configs)
    if missing:
        raise RuntimeError(f"{REFERENCE_DIR / 'synthetic.yaml'} lacks tasks {sorted(missing)}")
    return configs


@functools.lru_cache(maxsize=None)
def templates() -> dict:
    """{"tasks": {family: {template, answer_prefix, tokens_to_generate}}, "model_templates": {...}}."""
    with open(REFERENCE_DIR / "task_templates.json", encoding="utf-8") as f:
        return json.load(f)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from: {', '.join(TASKS)}")
    return task


def task_family(task: str) -> str:
    """niah | variable_tracking | common_words_extraction | freq_words_extraction | qa"""
    return task_configs()[check_task(task)]["task"]


def haystack_choices(task: str) -> tuple[str, ...]:
    """Haystacks a task can be generated with (RULER: niah any, vt noise or essay, others none)."""
    family = task_family(task)
    return HAYSTACKS if family == "niah" else ("noise", "essay") if family == "variable_tracking" else ()


def task_args(task: str) -> dict:
    return dict(task_configs()[check_task(task)]["args"])


def task_template(task: str) -> dict:
    return templates()["tasks"][task_family(task)]


def tokens_to_generate(task: str) -> int:
    return int(task_template(task)["tokens_to_generate"])


def parse_task_list(text: str) -> list[str]:
    """Comma list of task names ("all" = the 13, "default" = the 11 offline ones)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    out: list[str] = []
    for name in names:
        expanded = {"all": TASKS, "default": DEFAULT_TASKS}.get(name, (name,))
        for task in expanded:
            check_task(task)
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError(f"empty task list {text!r}; choose from: {', '.join(TASKS)}")
    return out
