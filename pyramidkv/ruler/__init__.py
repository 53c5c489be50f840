"""Offline RULER generator (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv:2404.06654).

    from pyramidkv.ruler import TASKS, DEFAULT_TASKS, generate_sample, generate_samples
    sample = generate_sample("niah_single_1", tokenizer, max_seq_length=4096, index=0, seed=42)

CLI: python -m pyramidkv.ruler --help  (writes {data_dir}/{length}/{task}.jsonl)
Task parameters and templates: pyramidkv/reference/ruler/ (NVIDIA/RULER, Apache-2.0).
"""
from .fitting import count_tokens
from .generator import generate_sample, generate_samples, sample_seed
from .spec import DEFAULT_TASKS, TASKS, parse_task_list, tokens_to_generate

__all__ = ["TASKS", "DEFAULT_TASKS", "generate_sample", "generate_samples", "count_tokens",
           "parse_task_list", "sample_seed", "tokens_to_generate"]
