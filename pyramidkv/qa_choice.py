"""Multiple-choice QA by log-likelihood, full cache vs compressed cache (CaM's QA protocol).

Input: lm-eval-harness-style jsonl, one question per line: `context` (the prompt), `choices` (the
continuations, usually with a leading space) and `gold` (index of the right one); `id` optional.
For each question the context is prefilled once (under the method for the compressed side: the cache is
compressed at that prefill), then every choice is scored as a continuation on a copy of that cache:
log P(choice | context) = the sum of its tokens' log-probabilities. The prediction is the argmax (acc)
or the argmax of log-probability per character of the choice (acc_norm, lm-eval-harness's definition).

The bundled smoke sample `data/qa_choice_smoke/choices.jsonl` (12 self-written questions on fictional
passages) is NOT openbookqa, piqa, copa, winogrande or mathqa.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import statistics
import time

from .predict import REPO_ROOT, CLIError

SMOKE_FILE = os.path.join(REPO_ROOT, "data", "qa_choice_smoke", "choices.jsonl")
MB = 1024 * 1024
CSV_COLUMNS = ("id", "kv_method", "gold", "pred_before", "pred_after", "correct_before", "correct_after",
               "correct_norm_before", "correct_norm_after", "memory_before_MB", "memory_after_MB",
               "time_before_s", "time_after_s", "prompt_tokens", "kv_budget")


def load_questions(path: str) -> list[dict]:
    """Questions of a jsonl file; a bad line is a one-line error naming file, line and field."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{path}:{line_no}: malformed JSON line ({err.msg})") from None
            for field in ("context", "choices", "gold"):
                if not isinstance(record, dict) or field not in record:
                    raise CLIError(f"{path}:{line_no}: missing field {field!r} (a question needs context, "
                                   "choices, gold)")
            choices, gold = record["choices"], record["gold"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c
                                                                         for c in choices):
                raise CLIError(f"{path}:{line_no}: field 'choices' must be a list of at least 2 non-empty strings")
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise CLIError(f"{path}:{line_no}: field 'gold' {gold!r} is not an index into its "
                               f"{len(choices)} choices")
            questions.append({"id": str(record.get("id", f"q{len(questions)}")), "context": record["context"],
                              "choices": choices, "gold": gold})
    if not questions:
        raise CLIError(f"{path}: no questions")
    return questions


def score_choices(model, context_ids: list[int], choice_ids: list[list[int]], method: str | None = None,
                  method_config: dict | None = None) -> dict:
    """Log-likelihood of each choice after the context, the K/V bytes the context's cache holds, time."""
    import contextlib

    import torch

    import pyramidkv
    from .timed_generation import kv_cache_bytes

    scope = pyramidkv.compress(model, method, **(method_config or {})) if method else contextlib.nullcontext()
    device = model.device
    with torch.inference_mode(), scope:
        start = time.perf_counter()
        out = model(input_ids=torch.tensor([context_ids], device=device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        cache = out.past_key_values
        kv_bytes = kv_cache_bytes(cache)
        scores = []
        for ids in choice_ids:
            score = first[ids[0]]
            if len(ids) > 1:  # the rest of the choice runs on a copy of the (compressed) context cache
                step = model(input_ids=torch.tensor([ids[:-1]], device=device),
                             past_key_values=copy.deepcopy(cache), use_cache=True)
                logprobs = torch.log_softmax(step.logits[0].float(), -1)
                score = score + logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()
            scores.append(float(score))
        elapsed = time.perf_counter() - start
    kept = cache.kept_tokens() if hasattr(cache, "kept_tokens") else None
    return {"scores": scores, "kv_bytes": kv_bytes, "time_s": elapsed, "kept_tokens": kept}


def predictions(scores: list[float], choices: list[str]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character)."""
    pred = max(range(len(scores)), key=lambda i: scores[i])
    pred_norm = max(range(len(scores)), key=lambda i: scores[i] / len(choices[i]))
    return pred, pred_norm


def csv_row(record: dict) -> dict:
    row = {key: record[key] for key in ("id", "kv_method", "gold", "prompt_tokens", "kv_budget")}
    for side in ("before", "after"):
        row[f"pred_{side}"] = record[f"pred_{side}"]
        row[f"correct_{side}"] = int(record[f"pred_{side}"] == record["gold"])
        row[f"correct_norm_{side}"] = int(record[f"pred_norm_{side}"] == record["gold"])
        row[f"memory_{side}_MB"] = round(record[f"kv_bytes_{side}"] / MB, 6)
        row[f"time_{side}_s"] = round(record[f"time_{side}_s"], 6)
    return row


def write_outputs(output_dir: str, records: list[dict], config: dict) -> dict:
    rows = [csv_row(r) for r in records]
    path = os.path.join(output_dir, "results.csv")
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)

    def mean(key):
        return statistics.fmean(r[key] for r in rows)

    summary = {
        "num_questions": len(rows),
        "metrics_before": {"acc": 100 * mean("correct_before"), "acc_norm": 100 * mean("correct_norm_before")},
        "metrics_after": {"acc": 100 * mean("correct_after"), "acc_norm": 100 * mean("correct_norm_after")},
        "agreement": 100 * statistics.fmean(r["pred_before"] == r["pred_after"] for r in rows),
        "memory_before_MB": mean("memory_before_MB"), "memory_after_MB": mean("memory_after_MB"),
        "avg_memory_saving_MB": statistics.fmean(r["memory_before_MB"] - r["memory_after_MB"] for r in rows),
        "time_before": mean("time_before_s"), "time_after": mean("time_after_s"),
        "avg_time_saving_s": statistics.fmean(r["time_before_s"] - r["time_after_s"] for r in rows),
        "definitions": {
            "acc": "% of questions whose highest log-likelihood choice is gold",
            "acc_norm": "same with log-likelihood divided by the choice's length in characters",
            "agreement": "% of questions where full and compressed caches pick the same choice",
            "memory_*_MB": "bytes of K/V the context's cache stores after prefill / 2**20",
            "time_*_s": "context prefill (incl. compression) + scoring every choice",
        },
        "config": config,
    }
    with open(os.path.join(output_dir, "summary.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False, default=str)
    os.replace(os.path.join(output_dir, "summary.json.tmp"), os.path.join(output_dir, "summary.json"))
    return summary
