"""run_summarization.py's outputs: ROUGE, the per-sample CSV, the JSON summary, the stored run settings.

Files in --output_dir:
  samples.jsonl  one record per finished sample (the resume state; everything measured)
  results.csv    SimCalKV's per-sample columns + reference + per-sample ROUGE (rewritten every run)
  summary.json   SimCalKV's summary keys + ROUGE before/after + the full config (rewritten every run)
  config.json    the settings the results were made with; a rerun with other settings is refused
"""
from __future__ import annotations

import csv
import json
import os
import statistics

from .predict import CLIError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MB = 1024 * 1024
CSV_COLUMNS = ("id", "dataset", "kv_method", "memory_before_MB", "memory_after_MB", "time_before_s",
               "time_after_s", "throughput_before_tokens_s", "throughput_after_tokens_s", "answer_before",
               "answer_after", "reference") + tuple(
    f"{rouge}_{side}" for side in ("before", "after") for rouge in ROUGE_TYPES)
SAMPLES_FILE, CSV_FILE, SUMMARY_FILE, CONFIG_FILE = "samples.jsonl", "results.csv", "summary.json", "config.json"
DEFINITIONS = {
    "rouge": "F1 x 100 from rouge-score 0.1.2 (use_stemmer=True), per sample, averaged over samples",
    "memory_*_MB": "bytes of the K/V the cache stores after generation (kept prompt tokens + generated "
                   "tokens, all layers) / 2**20; same count for DynamicCache and CompressedCache",
    "memory_*_allocated_MB": "bytes allocated for them / 2**20: CompressedCache.nbytes() includes the "
                             "spare room of its decode buffer (up to 256 tokens per layer)",
    "time_*_s": "wall-clock prefill (incl. compression) + decode of one sample",
    "throughput_*_tokens_s": "generated tokens / time_*_s",
    "avg_*_saving / improvement": "mean over samples of before - after (time, memory) or after - before "
                                  "(throughput)",
}


class RougeF1:
    """ROUGE-1/2/L F1 with stemming, as the summarization literature reports (Lin 2004)."""

    def __init__(self):
        from rouge_score import rouge_scorer
        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

    def __call__(self, prediction: str, reference: str) -> dict[str, float]:
        scores = self._scorer.score(reference, prediction)
        return {rouge: 100.0 * scores[rouge].fmeasure for rouge in ROUGE_TYPES}


# ----------------------------------------------------------------------------- settings
def check_settings(output_dir: str, settings: dict, info: dict) -> None:
    """Store the settings in output_dir/config.json, or refuse (one line) if it holds other ones."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f).get("settings", {})
        differing = [f"{key} {stored.get(key)!r} (now {settings.get(key)!r})"
                     for key in sorted(set(stored) | set(settings)) if stored.get(key) != settings.get(key)]
        if differing:
            raise CLIError(f"{output_dir} holds results made with other settings: {'; '.join(differing)}; "
                           "pass another --output_dir or remove that directory")
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "info": info}, f, indent=2, ensure_ascii=False, default=str)


def load_records(output_dir: str) -> dict[str, dict]:
    from .result_files import load_done_ids  # drops a line cut short by a crash
    path = os.path.join(output_dir, SAMPLES_FILE)
    load_done_ids(path, key="id")
    records = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    records[record["id"]] = record
    return records


# ----------------------------------------------------------------------------- outputs
def csv_row(record: dict) -> dict:
    row = {
        "id": record["id"], "dataset": record["dataset"], "kv_method": record["kv_method"],
        "answer_before": record["answer_before"], "answer_after": record["answer_after"],
        "reference": record["reference"],
    }
    for side in ("before", "after"):
        row[f"memory_{side}_MB"] = round(record[f"kv_bytes_{side}"] / MB, 6)
        row[f"time_{side}_s"] = round(record[f"time_{side}_s"], 6)
        row[f"throughput_{side}_tokens_s"] = round(record[f"new_tokens_{side}"] / record[f"time_{side}_s"], 4)
        for rouge in ROUGE_TYPES:
            row[f"{rouge}_{side}"] = round(record[f"rouge_{side}"][rouge], 4)
    return row


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def summarize(records: list[dict], config: dict) -> dict:
    rows = [csv_row(r) for r in records]
    summary = {
        "num_samples": len(rows),
        "metrics_before": {rouge: _mean(r["rouge_before"][rouge] for r in records) for rouge in ROUGE_TYPES},
        "metrics_after": {rouge: _mean(r["rouge_after"][rouge] for r in records) for rouge in ROUGE_TYPES},
        "memory_before_MB": _mean(r["memory_before_MB"] for r in rows),
        "memory_after_MB": _mean(r["memory_after_MB"] for r in rows),
        "memory_before_allocated_MB": _mean(r["kv_allocated_bytes_before"] / MB for r in records),
        "memory_after_allocated_MB": _mean(r["kv_allocated_bytes_after"] / MB for r in records),
        "avg_memory_saving_MB": _mean(r["memory_before_MB"] - r["memory_after_MB"] for r in rows),
        "time_before": _mean(r["time_before_s"] for r in rows),
        "time_after": _mean(r["time_after_s"] for r in rows),
        "avg_time_saving_s": _mean(r["time_before_s"] - r["time_after_s"] for r in rows),
        "throughput_before": _mean(r["throughput_before_tokens_s"] for r in rows),
        "throughput_after": _mean(r["throughput_after_tokens_s"] for r in rows),
        "avg_throughput_improvement_tokens_s": _mean(
            r["throughput_after_tokens_s"] - r["throughput_before_tokens_s"] for r in rows),
        "ttft_before_s": _mean(r["prefill_s_before"] for r in records),
        "ttft_after_s": _mean(r["prefill_s_after"] for r in records),
        "new_tokens_before": _mean(r["new_tokens_before"] for r in records),
        "new_tokens_after": _mean(r["new_tokens_after"] for r in records),
        "prompt_tokens": _mean(r["prompt_tokens"] for r in records),
        "kv_budget_tokens": _mean(r["kv_budget"] for r in records),
        "truncated_prompts": sum(bool(r["truncated"]) for r in records),
        "definitions": DEFINITIONS,
        "config": config,
    }
    return summary


def write_outputs(output_dir: str, records: list[dict], config: dict) -> dict:
    """Rewrite results.csv and summary.json for these records (atomic replace); returns the summary."""
    csv_path = os.path.join(output_dir, CSV_FILE)
    with open(csv_path + ".tmp", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(csv_row(record))
    os.replace(csv_path + ".tmp", csv_path)
    summary = summarize(records, config)
    json_path = os.path.join(output_dir, SUMMARY_FILE)
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False, default=str)
    os.replace(json_path + ".tmp", json_path)
    return summary
