"""Summarization before vs after KV-cache compression, in SimCalKV's protocol (and with its flags).

    python run_summarization.py --dataset cnn_dailymail --split "test[:3]" --compress_ratio 0.4 \\
        --kv_method SnapKV --output_dir out/

For every sample: a greedy generation with the full cache (transformers' DynamicCache, or --baseline
fullkv) and one under --kv_method keeping max(window + 1, ceil((1 - ratio) * prompt tokens)) tokens per
layer and KV head, each timed (prefill incl. compression, decode) and measured (K/V bytes held after
generation), both scored with ROUGE against the reference. Writes --output_dir/{samples.jsonl,
results.csv, summary.json, config.json} (see pyramidkv/summary_report.py); a rerun skips finished ids.
Data: a local file, the hub via `datasets`, or the bundled smoke sample (see pyramidkv/summarization.py).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import os
import sys

CHOICES = {"attn_implementation": ("eager", "sdpa", "flash_attention_2"),
           "dtype": ("auto", "float32", "bfloat16", "float16"), "device": ("auto", "cpu", "cuda"),
           "pooling": ("maxpool", "avgpool"), "chat_template": ("auto", "none"),
           "baseline": ("dynamic", "fullkv"), "data_source": ("auto", "local", "hub", "smoke")}
DATASET_NAMES = "cnn_dailymail, xsum, multi_news, LongBench/gov_report"


def build_parser() -> argparse.ArgumentParser:
    # no torch / transformers / pyramidkv import here: --help must be instant
    p = argparse.ArgumentParser(description="Summarization (ROUGE), memory, time and throughput before and "
                                            "after KV-cache compression (SimCalKV's protocol).")
    add_model_args(p)
    p.add_argument("--dataset", "--input_path", dest="dataset", default="cnn_dailymail",
                   help=f"{DATASET_NAMES}, or a local .jsonl/.json/.parquet/.arrow file, e.g. CaM's HELM-style "
                        "data/xsum_0shot.jsonl (article = whole prompt, summary_gt) (default: cnn_dailymail)")
    p.add_argument("--split", default=None,
                   help='datasets slicing syntax: "test[:100]", "validation[:10]", "test[:10%%]" (default: '
                        "test[:10]; a local file given as --dataset: all of it); a slice past the end is an error")
    p.add_argument("--compress_ratio", type=float, default=None,
                   help="fraction of the prompt's K/V removed, in [0, 1) (default: 0.4)")
    p.add_argument("--kv_method", "--method", dest="kv_method", default="SnapKV",
                   help="any pyramidkv method, any case (default: SnapKV)")
    p.add_argument("--output_dir", default=None,
                   help="results directory (default: results_summarization/<dataset>_<method>_<ratio>)")
    g = p.add_argument_group("CaM's budget flags (instead of --compress_ratio)")
    g.add_argument("--start_ratio", type=float, default=None,
                   help="fraction of the prompt kept besides the recent tokens (StreamingLLM: as sinks)")
    g.add_argument("--recent_ratio", type=float, default=None,
                   help="fraction of the prompt kept as the most recent tokens (= the observation window)")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data",
                   help="looks for {data_dir}/{dataset}/{split}.{jsonl,json,parquet,arrow} or "
                        "{data_dir}/{dataset}.{ext}, e.g. data/LongBench/gov_report.jsonl (default: data)")
    g.add_argument("--data_source", default="auto", choices=CHOICES["data_source"],
                   help="auto: local file, else the hub (or its cache), else the bundled smoke sample")
    g.add_argument("--hub_name", default=None, help="hub dataset id to load instead of the dataset's own")
    g = p.add_argument_group("token budgets (default: per dataset, SimCalKV's nums_token prefill+decode)")
    g.add_argument("--max_prompt_tokens", type=int, default=None,
                   help="prompt tokens (document cut to fit): XSUM 512, CNN/DM 1024, Multi-News 2048, "
                        "GovReport 4096")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help="new tokens: XSUM 64, CNN/DM 64, Multi-News 512, GovReport 512")
    add_compression_args(p)
    g = p.add_argument_group("full-cache baseline and prompt")
    g.add_argument("--baseline", default="dynamic", choices=CHOICES["baseline"],
                   help="dynamic = transformers' DynamicCache (what an unpatched model uses); fullkv = FullKV "
                        "through pyramidkv's cache (same decode mechanics as the methods)")
    g.add_argument("--chat_template", default="auto", choices=CHOICES["chat_template"],
                   help="auto: wrap the prompt in the tokenizer's chat template when it has one")
    add_run_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_name", "--model_path", dest="model_path", default=None,
                   help="smollm2 (the default: SmolLM2-135M-Instruct), tiny (the embedded checkpoint), a "
                        "checkpoint dir, a .gguf file or a hub id")


def add_compression_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    g.add_argument("--window_size", type=int, default=8, help="observation window (default: 8)")
    g.add_argument("--kernel_size", type=int, default=7, help="pooling kernel (default: 7)")
    g.add_argument("--pooling", default="maxpool", choices=CHOICES["pooling"])
    g.add_argument("--beta", type=float, default=None, help="PyramidKV budget ratio (method default if unset)")
    g.add_argument("--sink_size", type=int, default=None, help="StreamingLLM sink tokens (method default)")
    g.add_argument("--skip_layers", type=int, default=None, help="L2Norm uncompressed first layers")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--attn_implementation", default="sdpa", choices=CHOICES["attn_implementation"])
    g.add_argument("--dtype", default="auto", choices=CHOICES["dtype"], help="auto = bfloat16 on cuda, else float32")
    g.add_argument("--device", default="auto", choices=CHOICES["device"])
    g.add_argument("--num_threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=42)


def check_numbers(args) -> None:
    from pyramidkv.predict import CLIError
    if args.compress_ratio is not None and not 0.0 <= args.compress_ratio < 1.0:
        raise CLIError(f"--compress_ratio {args.compress_ratio} is outside [0, 1): it is the fraction of "
                       "the prompt's K/V removed (0.4 keeps 60%)")
    for flag in ("max_prompt_tokens", "max_new_tokens", "window_size", "kernel_size", "num_threads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CLIError(f"--{flag} {value} must be at least 1")


def check_cam_ratios(args) -> None:
    """CaM's --start_ratio/--recent_ratio replace --compress_ratio: 1 - (start + recent) is removed."""
    from pyramidkv.predict import CLIError
    given = [r for r in (args.start_ratio, args.recent_ratio) if r is not None]
    if not given:
        args.compress_ratio = 0.4 if args.compress_ratio is None else args.compress_ratio
        return
    if args.compress_ratio is not None:
        raise CLIError(f"--compress_ratio {args.compress_ratio} and --start_ratio/--recent_ratio both set the "
                       "budget; give one or the other")
    if len(given) == 1 or any(not 0.0 <= r <= 1.0 for r in given) or not 0.0 < sum(given) <= 1.0:
        raise CLIError(f"--start_ratio {args.start_ratio} / --recent_ratio {args.recent_ratio}: give both, "
                       "each in [0, 1], with 0 < start + recent <= 1")
    args.compress_ratio = round(max(0.0, 1.0 - args.start_ratio - args.recent_ratio), 9)


DECODE_RATIO_METHODS = ("H2O", "CaM")  # methods whose ratio form also compresses while generating


def sample_config(args, prompt_tokens: int) -> dict:
    """The method config of one sample: the per-sample budget (and CaM's per-sample window and sinks)."""
    from pyramidkv import summary_prompt
    if args.recent_ratio is None:
        budget = summary_prompt.kv_budget(prompt_tokens, args.compress_ratio, args.window_size)
        return method_config(args, budget)
    if args.kv_method in DECODE_RATIO_METHODS:
        # CaM's --enable_small_cache runs of H2O / CaM: heavy + recent fixed from the prompt, held while generating
        config = {**method_config(args, 0), "heavy_ratio": args.start_ratio, "recent_ratio": args.recent_ratio}
        del config["max_capacity_prompt"], config["window_size"]
        return config
    window = max(1, math.ceil(args.recent_ratio * prompt_tokens))
    budget = summary_prompt.kv_budget(prompt_tokens, args.compress_ratio, window)
    config = {**method_config(args, budget), "window_size": window}
    if args.kv_method == "StreamingLLM":
        config["sink_size"] = math.ceil(args.start_ratio * prompt_tokens)
    return config


def budget_and_window(method: str, config: dict, prompt_tokens: int) -> tuple[int, int]:
    """(KV budget, recent window) of one sample's config; the ratio form's come from its prompt length."""
    if "heavy_ratio" not in config:
        return config["max_capacity_prompt"], config["window_size"]
    import pyramidkv
    heavy, recent = pyramidkv.build_method(method, **config).ratio_budgets(prompt_tokens)
    return heavy + recent, recent


def method_config(args, budget: int, extras: bool = True) -> dict:
    config = {"max_capacity_prompt": budget, "window_size": args.window_size,
              "kernel_size": args.kernel_size, "pooling": args.pooling}
    for optional in ("beta", "sink_size", "skip_layers") if extras else ():
        if getattr(args, optional) is not None:
            config[optional] = getattr(args, optional)
    return config


def resolve_model(args, predict) -> tuple[str, str | None]:
    """(model name, fingerprint) without loading; uses predict.resolve_model where it exists."""
    if hasattr(predict, "resolve_model"):
        resolved = predict.resolve_model(args)
        return resolved.name, resolved.fingerprint()
    return predict.model_name(args), predict.model_fingerprint(args.model_path)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from pyramidkv.sharding import refuse_sharding
    refuse_sharding("run_summarization.py")
    import pyramidkv
    from pyramidkv import predict, summarization, summary_report

    check_numbers(args)
    check_cam_ratios(args)
    args.model_path = args.model_path or getattr(predict, "DEFAULT_MODEL", "smollm2")
    predict.check_method(args.kv_method)
    try:  # method settings checked at the smallest valid budget, before data and model
        method = pyramidkv.build_method(args.kv_method, **method_config(args, args.window_size + 1)).name
    except ValueError as err:
        raise predict.CLIError(str(err)) from None
    args.kv_method = method  # canonical spelling from here on
    if args.recent_ratio is not None and method in DECODE_RATIO_METHODS:
        try:
            pyramidkv.build_method(method, **sample_config(args, 1))
        except ValueError as err:
            raise predict.CLIError(str(err)) from None
    samples = summarization.load_samples(args.dataset, args.split, args.data_dir, args.data_source,
                                         args.hub_name)
    spec = samples.spec
    max_prompt = args.max_prompt_tokens or spec.max_prompt_tokens
    max_new = args.max_new_tokens or spec.max_new_tokens
    if args.max_new_tokens is None and any(row.get("max_new_tokens") for row in samples.rows):
        max_new = "per request (the file's max_tokens)"
    model_name, fingerprint = resolve_model(args, predict)
    output_dir = os.path.normpath(args.output_dir) if args.output_dir else os.path.join(
        "results_summarization", f"{spec.name.replace('/', '_')}_{method}_{args.compress_ratio:g}")
    print(f"data: {len(samples.rows)} samples from {samples.description}", file=sys.stderr, flush=True)

    device = predict.resolve_device(args.device)
    settings = {
        "model_name": model_name, "model_fingerprint": fingerprint,
        "dataset": spec.name, "data_source": samples.source, "kv_method": method,
        "compress_ratio": args.compress_ratio, "start_ratio": args.start_ratio, "recent_ratio": args.recent_ratio,
        # H2O / CaM with the ratios: heavy + recent held while generating too (earlier files: prefill only)
        "ratio_form": "decode" if args.recent_ratio is not None and method in DECODE_RATIO_METHODS else None,
        "max_prompt_tokens": max_prompt, "max_new_tokens": max_new,
        "method_config": {k: v for k, v in method_config(args, 0).items() if k != "max_capacity_prompt"},
        "baseline": args.baseline, "attn_implementation": args.attn_implementation, "dtype": args.dtype,
        "device": device, "dtype_resolved": str(predict.resolve_dtype(args.dtype, device)).replace("torch.", ""),
        "chat_template": args.chat_template, "seed": args.seed,
        "prompt": spec.prompt,
    }
    info = {
        "budget_rule": "per sample: max_capacity_prompt = max(window_size + 1, ceil((1 - compress_ratio) "
                       "* prompt_tokens)) tokens per layer and KV head (window included)",
        "model": args.model_path, "budget_source": spec.budget_source, "data": samples.description, "split": samples.split,
        "truncation": "document cut from its end so the whole prompt fits max_prompt_tokens (a complete "
                      "HELM prompt loses its middle instead)",
        "decoding": "greedy, stops at EOS or max_new_tokens", "command": " ".join(sys.argv),
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    summary_report.check_settings(output_dir, settings, info)  # refuse mixing before loading a model
    records = summary_report.load_records(output_dir)
    pending = list({row["id"]: row for row in samples.rows if row["id"] not in records}.values())

    if pending:
        for chatty in ("pyramidkv", "absl"):  # per-sample kept-token / rouge-score logs would break tqdm
            logging.getLogger(chatty).setLevel(logging.WARNING)
        predict.set_seed(args.seed)
        model, tokenizer = predict.load_model_and_tokenizer(args)
        scorer = summary_report.RougeF1()
        from tqdm import tqdm

        from pyramidkv.result_files import append_jsonl
        for row in tqdm(pending, desc=f"{spec.name} {method} r={args.compress_ratio:g}", unit="sample"):
            record = run_sample(args, model, tokenizer, spec, row, method, max_prompt, max_new, scorer)
            append_jsonl(os.path.join(output_dir, summary_report.SAMPLES_FILE), record)
            records[record["id"]] = record
    selected = [records[row["id"]] for row in samples.rows]
    summary = summary_report.write_outputs(output_dir, selected, {**settings, **info})
    before, after = summary["metrics_before"], summary["metrics_after"]
    print(f"{len(selected)} samples ({len(selected) - len(pending)} from a previous run) -> {output_dir}/"
          f"{{{summary_report.CSV_FILE},{summary_report.SUMMARY_FILE}}}\n"
          f"ROUGE-1/2/L before {before['rouge1']:.2f}/{before['rouge2']:.2f}/{before['rougeL']:.2f}, "
          f"after {after['rouge1']:.2f}/{after['rouge2']:.2f}/{after['rougeL']:.2f}; K/V MB "
          f"{summary['memory_before_MB']:.3f} -> {summary['memory_after_MB']:.3f}; tokens/s "
          f"{summary['throughput_before']:.1f} -> {summary['throughput_after']:.1f}", file=sys.stderr)


def run_sample(args, model, tokenizer, spec, row, method, max_prompt, max_new, scorer) -> dict:
    from pyramidkv import summary_prompt
    from pyramidkv.timed_generation import eos_token_ids, timed_greedy

    input_ids, truncated = summary_prompt.build_prompt(tokenizer, spec, row["document"], max_prompt,
                                                      args.chat_template, row.get("complete_prompt", False))
    config = sample_config(args, len(input_ids))
    budget, window = budget_and_window(method, config, len(input_ids))
    if not isinstance(max_new, int):
        max_new = row.get("max_new_tokens") or spec.max_new_tokens
    eos = eos_token_ids(model, tokenizer)
    base_config = {"max_capacity_prompt": budget, "window_size": window, "kernel_size": config["kernel_size"],
                   "pooling": config["pooling"]}
    full = timed_greedy(model, input_ids, max_new, eos, *(("FullKV", base_config)
                                                         if args.baseline == "fullkv" else ()))
    compressed = timed_greedy(model, input_ids, max_new, eos, method, config)
    record = {"id": row["id"], "dataset": spec.name, "kv_method": method, "prompt_tokens": len(input_ids),
              "truncated": truncated, "kv_budget": budget, "reference": row["reference"],
              "kept_tokens_after": compressed.kept_tokens, "window_size": window}
    for side, result in (("before", full), ("after", compressed)):
        answer = cut_at_stop(tokenizer.decode(result.token_ids, skip_special_tokens=True), row.get("stop"))
        record.update({f"answer_{side}": answer, f"new_tokens_{side}": len(result.token_ids),
                       f"prefill_s_{side}": result.prefill_s, f"decode_s_{side}": result.decode_s,
                       f"time_{side}_s": result.total_s, f"kv_bytes_{side}": result.kv_bytes,
                       f"kv_allocated_bytes_{side}": result.kv_allocated_bytes,
                       f"rouge_{side}": scorer(answer, row["reference"])})
    return record


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """The answer up to the first stop string (HELM requests stop at "###"), stripped."""
    for marker in stop or ():
        if marker and marker in text:
            text = text[: text.index(marker)]
    return text.strip()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("torch", "transformers", "datasets", "rouge-score", "pyramidkv"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags end here, before the heavy imports
    from pyramidkv.predict import run_cli
    sys.exit(run_cli(main))
