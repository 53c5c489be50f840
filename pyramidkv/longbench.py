"""LongBench v1 protocol: datasets, data files, official prompts, middle truncation, chat template.

Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding" (ACL 2024,
arXiv:2308.14508). Prompt templates, max new tokens and model max lengths are the official config
files kept in pyramidkv/reference/longbench/ (MIT, THUDM).
"""
from __future__ import annotations

import json
import os

from .predict import REPO_ROOT, CLIError
from .result_files import read_jsonl_strict

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "longbench")
SMOKE_DATA_DIR = os.path.join(REPO_ROOT, "data", "longbench_smoke")
DEFAULT_DATA_DIR = os.path.join("data", "LongBench")

ENGLISH_DATASETS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
                    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
                    "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
CHINESE_DATASETS = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
ALL_DATASETS = ENGLISH_DATASETS + CHINESE_DATASETS
LONGBENCH_E_DATASETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
                        "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc",
                        "repobench-p")
# Few-shot and code sets: upstream finds chat models do better on the raw prompt (no chat template).
NO_CHAT_TEMPLATE_DATASETS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
# samsum answers are one line; upstream also stops generation at a newline token.
STOP_STRINGS = {"samsum": ["\n"]}
REQUIRED_FIELDS = ("input", "context", "answers", "length", "_id")
HUB_REPO = "THUDM/LongBench"
# Upstream sets max prompt length ~500 tokens under the context window (3500 for 4k models, ...).
GENERATION_ROOM = 500
MAX_LENGTH_CAP = 131072


def _reference(name: str) -> dict:
    with open(os.path.join(REFERENCE_DIR, name), encoding="utf-8") as f:
        return json.load(f)


DATASET_TO_PROMPT = _reference("dataset2prompt.json")
DATASET_TO_MAX_NEW_TOKENS = _reference("dataset2maxlen.json")
MODEL_TO_MAX_LENGTH = _reference("model2maxlen.json")


def parse_datasets(spec: str | None, longbench_e: bool = False) -> list[str]:
    """'--datasets' value -> dataset names. None: the 16 English sets (13 for LongBench-E); 'all': 21."""
    valid = LONGBENCH_E_DATASETS if longbench_e else ALL_DATASETS
    if spec is None or spec == "":
        return list(LONGBENCH_E_DATASETS if longbench_e else ENGLISH_DATASETS)
    if spec.lower() == "all":
        return list(valid)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in valid:
            kind = "LongBench-E" if longbench_e else "LongBench"
            raise CLIError(f"unknown {kind} dataset {name!r}; valid choices: all, {', '.join(valid)}")
    return names


def data_file(data_dir: str, dataset: str, longbench_e: bool = False) -> str:
    return os.path.join(data_dir, f"{dataset}_e.jsonl" if longbench_e else f"{dataset}.jsonl")


def resolve_data_dir(data_dir: str | None) -> tuple[str, str]:
    """(directory, source). Without --data_dir: data/LongBench if present, else the smoke sample."""
    if data_dir is not None:
        return data_dir, "user"
    for candidate in (DEFAULT_DATA_DIR, os.path.join(REPO_ROOT, DEFAULT_DATA_DIR)):
        if os.path.isdir(candidate):
            return candidate, "LongBench"
    return SMOKE_DATA_DIR, "smoke"


def load_jsonl_samples(path: str, dataset: str) -> list[dict]:
    """Samples of one LongBench jsonl file; bad lines are one-line errors naming file:line."""
    if not os.path.exists(path):
        raise CLIError(
            f"LongBench file {path} not found: download data.zip from the dataset repo "
            f"https://huggingface.co/datasets/{HUB_REPO} and unzip its data/*.jsonl into "
            f"{os.path.dirname(path) or '.'}/ (or pass --data_dir DIR, or --from_hub with `datasets`)")
    samples = read_jsonl_strict(path, REQUIRED_FIELDS, "LongBench")
    if not samples:  # a run over it would predict nothing and still exit 0
        raise CLIError(f"LongBench file {path} has no samples; restore it from LongBench's data.zip or "
                       "leave the dataset out of --datasets")
    for sample in samples:
        sample.setdefault("dataset", dataset)
    return samples


def load_hub_samples(dataset: str, longbench_e: bool = False) -> list[dict]:
    """Samples from the Hugging Face hub (needs the optional `datasets` package and network)."""
    try:
        import datasets
    except ImportError as err:
        raise CLIError("--from_hub needs the `datasets` package (pip install -e .[hub])") from err
    name = f"{dataset}_e" if longbench_e else dataset
    try:
        rows = datasets.load_dataset(HUB_REPO, name, split="test")
    except Exception as err:  # network, auth or format problems: keep the message to one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CLIError(f"cannot load {HUB_REPO}/{name} from the hub: {first}") from err
    if len(rows) == 0:
        raise CLIError(f"{HUB_REPO}/{name} on the hub has no test samples")
    return [dict(row) for row in rows]


def build_prompt(dataset: str, sample: dict) -> str:
    """The official prompt with the sample's context and input filled in.

    str.format is what upstream uses; the templates contain no other braces, and braces inside the
    filled values are not re-interpreted.
    """
    return DATASET_TO_PROMPT[dataset].format(context=sample["context"], input=sample["input"])


def truncate_middle(tokenizer, prompt: str, max_length: int) -> tuple[str, int]:
    """Official middle truncation: if the tokenized prompt (special tokens included) is longer than
    max_length, keep the text of its first and last max_length // 2 tokens (special tokens dropped)
    and return that text, to be re-tokenized. Returns (prompt, token count before truncation).
    """
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt, len(ids)
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, len(ids)


def model_max_length(model_path: str, config, override: int | None = None) -> tuple[int, str]:
    """(max prompt tokens, where the number comes from) for a model.

    Order: --max_length; the official model2maxlen.json entry whose key equals the checkpoint name
    (case-insensitive); else max_position_embeddings (capped at 128k) minus 500 tokens of room for
    generation, as the official entries do (3500 for 4k models, 31500 for 32k ones).
    """
    if override is not None:
        if override <= 1:
            raise CLIError(f"--max_length {override} is too small; give at least 2 tokens")
        return override, "--max_length"
    name = os.path.basename(os.path.normpath(model_path)).lower()
    for key, value in MODEL_TO_MAX_LENGTH.items():
        if key.lower() == name:
            return value, f"model2maxlen.json[{key}]"
    positions = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    if not positions:
        raise CLIError(f"cannot tell the context length of {model_path!r} (no max_position_embeddings); "
                       "pass --max_length")
    capped = min(int(positions), MAX_LENGTH_CAP)
    if capped > 2 * GENERATION_ROOM:
        return capped - GENERATION_ROOM, f"max_position_embeddings {positions} (capped) - {GENERATION_ROOM}"
    return capped // 2, f"max_position_embeddings {positions} // 2 (too short to leave {GENERATION_ROOM})"


def wants_chat_template(dataset: str) -> bool:
    return dataset not in NO_CHAT_TEMPLATE_DATASETS


def protocol_record() -> dict:
    """Protocol choices that published LongBench tables disagree on, for run_meta.json."""
    return {
        "prompts": "official dataset2prompt.json (THUDM/LongBench v1)",
        "max_new_tokens": "official dataset2maxlen.json",
        "truncation": "middle: tokenize with special tokens; if longer than max_length keep "
                      "decode(first max_length//2, skip_special_tokens) + decode(last max_length//2); "
                      "re-tokenize",
        "truncation_before_chat_template": True,
        "chat_template_skipped_for": list(NO_CHAT_TEMPLATE_DATASETS),
        "bos": "tokenizer adds BOS unless the (chat-templated) prompt already starts with it",
        "decoding": "greedy (do_sample=False, num_beams=1), only new tokens decoded, skip_special_tokens",
        "samsum_stop": "token id ending '\\n' added to the EOS ids, min_new_tokens=1 (as upstream)",
        "scoring_first_line_for": ["trec", "triviaqa", "samsum", "lsht"],
    }
