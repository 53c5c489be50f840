"""Long-text perplexity with the KV cache compressed while decoding (CS3602's and CaM's protocol).

    python run_ppl.py --method streaming_llm --start_size 4 --recent_size 508          # one run
    python run_ppl.py --method streaming_llm --start_size 4 --recent_sizes 252,508,1020
    python run_ppl.py --method l2_compress --keep_ratios 1.0,0.8,0.5
    python run_ppl.py --method fix_size_l2 --fix_kv_sizes 256,512 --strategies keep_low
    python run_ppl.py --method h2o_l2 --heavy_hitter_sizes 32,64,128
    python run_ppl.py --method h2o --cache_sizes 512,1024          # H2O as published; also cam, tova, recent_only
    python run_ppl.py --compare_all                                 # CS3602's table at cache sizes 512 and 1024
    python run_ppl.py --method streamingllm --start_size 32 --recent_size 32 --num_samples 10   # CaM's flags

The text (default: the bundled Shakespeare plays, data/ppl) is fed one token at a time for
--num_eval_tokens predictions (CS3602: 2000) with the method's decode rule applied after every step, so
the cache never holds more than its size (pyramidkv/ppl.py). Writes one JSON per run
(--output_dir/<run>.json: perplexity, accuracy, ttft_s, tpot_s, throughput_tok_s, kv_cache_tokens,
kv_cache_bytes and the config) and results.csv over every run there; a rerun skips finished runs.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

BASELINE_NAMES = ("fullkv", "dense", "baseline", "full")
SIZED_METHODS = ("streaming_llm", "recent_only", "h2o", "cam", "tova", "snapkv_lite", "pyramid_kv", "adaptive_l2",
                 "fix_size_l2", "h2o_l2")
COMPARE_METHODS = ("recent_only", "streaming_llm", "h2o_l2", "snapkv_lite", "pyramid_kv", "adaptive_l2",
                   "fix_size_l2", "h2o", "cam", "tova")
METRICS = ("perplexity", "accuracy", "ttft_s", "tpot_s", "throughput_tok_s", "kv_cache_tokens", "kv_cache_bytes")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    # no torch / transformers import here: --help must be instant
    p = argparse.ArgumentParser(description="Long-text perplexity, accuracy, TTFT, TPOT, throughput and KV size "
                                            "with compression while decoding (CS3602 / CaM protocol).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--model_path", "--model_name_or_path", dest="model_path", default="smollm2",
                   help="smollm2 (default, SmolLM2-135M-Instruct), tiny, a checkpoint dir, a .gguf file or a hub id")
    p.add_argument("--method", default="streaming_llm",
                   help="fullkv (the full cache), streaming_llm (= streamingllm), recent_only, h2o, cam, tova, or a "
                        "CS3602 method: l2_compress, fix_size_l2, h2o_l2, snapkv_lite, pyramid_kv, adaptive_l2")
    p.add_argument("--compare_all", action="store_true",
                   help="the baseline and every method at --cache_sizes (default 512,1024); prints CS3602's table")
    g = p.add_argument_group("cache size (tokens per layer and KV head)")
    g.add_argument("--start_size", type=int, default=4, help="attention sinks (default 4)")
    g.add_argument("--recent_size", type=int, default=508, help="recent tokens (default 508: 4 + 508 = 512)")
    g.add_argument("--recent_sizes", type=_ints, default=None, help="streaming_llm sweep, e.g. 252,508,1020")
    g.add_argument("--cache_sizes", type=_ints, default=None,
                   help="total cache sizes for the sized methods (default: start_size + recent_size)")
    g.add_argument("--enable_pos_shift", action="store_true",
                   help="positions by cache slot (StreamingLLM/CaM): kept tokens renumbered 0..K-1, keys re-rotated")
    g.add_argument("--compress_interval", type=int, default=1, help="compress every this many tokens (default 1)")
    g.add_argument("--window_size", type=int, default=None, help="H2O recent budget (default: half the cache)")
    g.add_argument("--heavy_ratio", "--start_ratio", "--start-ratio", dest="heavy_ratio", type=float, default=None,
                   help="H2O's / CaM's heavy budget as a fraction of the prompt (CaM: --start_ratio); refused here: "
                        "this protocol has no prompt (see ratio_error), use it with run_longbench.py / run_ruler.py")
    g.add_argument("--recent_ratio", "--recent-ratio", dest="recent_ratio", type=float, default=None,
                   help="H2O's / CaM's recent budget as a fraction of the prompt; refused here like --heavy_ratio")
    g = p.add_argument_group("CS3602 method sweeps")
    g.add_argument("--keep_ratios", type=_floats, default=None, help="l2_compress, e.g. 1.0,0.8,0.5")
    g.add_argument("--prune_after", type=int, default=1000, help="l2_compress: compress beyond this length")
    g.add_argument("--fix_kv_sizes", type=_ints, default=None, help="fix_size_l2, e.g. 256,512")
    g.add_argument("--strategies", default="keep_low", help="fix_size_l2: keep_low,keep_high,random")
    g.add_argument("--heavy_hitter_sizes", type=_ints, default=None, help="h2o_l2, e.g. 32,64,128")
    g.add_argument("--skip_layers", default=None,
                   help="layers kept whole, e.g. 0,1 or none (default: each method's own; CS3602's l2 family "
                        "and recent_only skip 0,1)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default="shakespeare", help="shakespeare (bundled), pg19 or wikitext")
    g.add_argument("--data_file", default=None, help="a .txt, .jsonl or .parquet file (column --text_field)")
    g.add_argument("--text_field", default="text")
    g.add_argument("--num_samples", type=int, default=1, help="texts evaluated (default 1)")
    g.add_argument("--num_eval_tokens", type=int, default=2000, help="predictions per text (default 2000)")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="default: results_ppl/<model>/<dataset>_<num_eval_tokens>")
    g.add_argument("--attn_implementation", default="sdpa", choices=("eager", "sdpa", "flash_attention_2"))
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--num_threads", type=int, default=None)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def _skip_layers(args) -> dict:
    if args.skip_layers is None:
        return {}
    if args.skip_layers.strip().lower() in ("none", ""):
        return {"skip_layers": ()}
    return {"skip_layers": tuple(int(v) for v in args.skip_layers.split(","))}


def sized_config(method: str, size: int, args) -> dict:
    """The method's config for a total cache size of `size` tokens per layer and KV head."""
    start, interval = args.start_size, {"compress_interval": args.compress_interval}
    if method == "streaming_llm":
        return {"start_size": start, "recent_size": size - start, **interval, **_skip_layers(args)}
    if method == "recent_only":
        return {"window_size": size, **interval, **_skip_layers(args)}
    if method in ("h2o", "cam"):  # CaM: H2O's decode eviction, evicted values merged (methods/cam.py)
        # the prefill budget is the cache size too (the default 128 would be below a recent budget of size / 2)
        return {"max_cache_size": size, "max_capacity_prompt": size, "window_size": args.window_size or size // 2, **interval}
    if method == "tova":
        return {"max_cache_size": size, **interval}
    own = {"snapkv_lite": "keep_size", "pyramid_kv": "base_size", "adaptive_l2": "target_size",
           "fix_size_l2": "fix_kv_size"}
    if method in own:
        return {own[method]: size, **interval, **_skip_layers(args)}
    if method == "h2o_l2":
        heavy = 64 if size >= 512 else size // 8
        return {"start_size": start, "heavy_hitter_size": heavy, "recent_size": size - start - heavy, **interval,
                **_skip_layers(args)}
    raise KeyError(method)


def ratio_error(args) -> str:
    """Why H2O's / CaM's ratio budgets are refused by this protocol (one line)."""
    return (f"--heavy_ratio/--start_ratio {args.heavy_ratio} / --recent_ratio {args.recent_ratio} are fractions of "
            f"the prompt length, and run_ppl.py has no prompt (the text is fed one token at a time from its first "
            f"token, so the budgets would be one token); give the cache in tokens (--cache_sizes, --window_size, "
            f"--start_size/--recent_size), or use the ratios where a prompt is prefilled: run_longbench.py / "
            f"run_ruler.py --method h2o|cam --heavy_ratio 0.1 --recent_ratio 0.1")


def planned_runs(args) -> list[tuple[str, str | None, dict, int | None]]:
    """(label, method or None = full cache, config, cache size) of every run the flags ask for."""
    from pyramidkv.predict import CLIError

    default_size = args.start_size + args.recent_size
    sizes = args.cache_sizes or ([512, 1024] if args.compare_all else [default_size])
    runs = [("baseline", None, {}, None)]
    if args.compare_all:
        methods = COMPARE_METHODS
    else:
        methods = (args.method.lower(),)
        if methods[0] in BASELINE_NAMES:
            return runs
        runs = []
    interval = {"compress_interval": args.compress_interval}
    for method in methods:
        if method in ("streamingllm", "streaming") or (method == "streaming_llm" and args.recent_sizes):
            recents = args.recent_sizes or [size - args.start_size for size in sizes]
            for recent in recents:
                config = {"start_size": args.start_size, "recent_size": recent, **interval, **_skip_layers(args)}
                runs.append((f"streaming_llm_{args.start_size + recent}", "streaming_llm", config,
                             args.start_size + recent))
        elif method == "l2_compress":
            for ratio in args.keep_ratios or [1.0, 0.8, 0.5]:
                config = {"keep_ratio": ratio, "prune_after": args.prune_after, **interval, **_skip_layers(args)}
                runs.append((f"l2_compress_{ratio:g}", method, config, None))
        elif method == "fix_size_l2" and (args.fix_kv_sizes or "," in args.strategies):
            for size in args.fix_kv_sizes or sizes:
                for strategy in args.strategies.split(","):
                    config = {**sized_config(method, size, args), "strategy": strategy}
                    runs.append((f"fix_size_l2_{size}_{strategy}", method, config, size))
        elif method == "h2o_l2" and args.heavy_hitter_sizes:
            for heavy in args.heavy_hitter_sizes:
                size = sizes[0]
                config = {"start_size": args.start_size, "heavy_hitter_size": heavy,
                          "recent_size": size - args.start_size - heavy, **interval, **_skip_layers(args)}
                runs.append((f"h2o_l2_{size}_hh{heavy}", method, config, size))
        elif method in SIZED_METHODS:
            for size in sizes:
                runs.append((f"{method}_{size}", method, sized_config(method, size, args), size))
        else:
            try:  # any other method with a decode form, sized by max_cache_size
                import pyramidkv
                name = pyramidkv.build_method(method, max_cache_size=sizes[0], **interval).name
            except ValueError as err:
                raise CLIError(str(err)) from None
            for size in sizes:
                runs.append((f"{name}_{size}", name, {"max_cache_size": size, **interval}, size))
    if args.enable_pos_shift:  # positions by cache slot (pyramidkv/pos_shift.py)
        runs = [(f"{label}_posshift", method, {**config, "pos_shift": True}, size) if method else
                (label, method, config, size) for label, method, config, size in runs]
    return runs


def check_runs(runs) -> None:
    """Every run's method settings built once before any model loads (one-line errors)."""
    import pyramidkv
    from pyramidkv.predict import CLIError

    for label, method, config, _ in runs:
        if method is None:
            continue
        try:
            pyramidkv.build_method(method, **config)
        except ValueError as err:
            raise CLIError(f"run {label}: {err}") from None


def protocol(args, description: str) -> dict:
    return {"model_path": args.model_path, "data": description, "num_samples": args.num_samples,
            "num_eval_tokens": args.num_eval_tokens, "attn_implementation": args.attn_implementation,
            "dtype": args.dtype, "device": args.device, "seed": args.seed}


def write_csv(output_dir: str) -> str:
    import json

    rows = []
    for name in sorted(os.listdir(output_dir)):
        if name.endswith(".json") and not name.startswith("_"):
            with open(os.path.join(output_dir, name)) as f:
                result = json.load(f)
            rows.append({"run": result["run"], "method": result["method"] or "baseline",
                         "cache_size": result.get("cache_size"), **{m: result[m] for m in METRICS}})
    path = os.path.join(output_dir, "results.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "method", "cache_size", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pyramidkv.ppl_compare import comparison_table, draw_figures
    from pyramidkv import ppl, predict
    from pyramidkv.predict import CLIError

    try:
        for flag in ("num_eval_tokens", "num_samples", "compress_interval", "start_size"):
            value = getattr(args, flag)
            if value < (0 if flag == "start_size" else 1):
                raise CLIError(f"--{flag} {value} is invalid: it must be {'>= 0' if flag == 'start_size' else '>= 1'}")
        if args.heavy_ratio is not None or args.recent_ratio is not None:
            raise CLIError(ratio_error(args))
        if args.recent_size <= 0:
            raise CLIError(f"--recent_size {args.recent_size} is invalid: it must be >= 1")
        runs = planned_runs(args)
        check_runs(runs)
        texts, description = ppl.load_texts(args.dataset_name, args.data_file, args.num_samples, args.text_field)
        model_name = predict.resolve_model(args).name
        output_dir = args.output_dir or os.path.join(
            "results_ppl", model_name, f"{'file' if args.data_file else args.dataset_name}_{args.num_eval_tokens}")
        os.makedirs(output_dir, exist_ok=True)
        settings = protocol(args, description)
        todo = [run for run in runs if not _finished(output_dir, run, settings)]
        print(f"{len(runs)} runs, {len(runs) - len(todo)} already done, in {output_dir}; data: {description}",
              file=sys.stderr, flush=True)
        if todo:
            predict.set_seed(args.seed)
            model, tokenizer = predict.load_model_and_tokenizer(args)
            token_lists = [ppl.token_ids_for(tokenizer, text, args.num_eval_tokens) for text in texts]
            for label, method, config, size in todo:
                per_sample = [ppl.evaluate_ids(model, ids, method, config, progress=not args.no_progress)
                              for ids in token_lists]
                result = {"run": label, "method": method, "config": config, "cache_size": size,
                          "settings": settings, **ppl.average(per_sample)}
                ppl.write_json(os.path.join(output_dir, f"{label}.json"), result)
                print(f"{label}: ppl {result['perplexity']:.3f}, acc {result['accuracy']:.4f}, "
                      f"kv {result['kv_cache_tokens']} tokens", file=sys.stderr, flush=True)
    except (CLIError, ppl.TextError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"table: {write_csv(output_dir)}", file=sys.stderr)
    if args.compare_all:
        import json
        results = {}
        for label, *_ in runs:
            with open(os.path.join(output_dir, f"{label}.json")) as f:
                results[label] = json.load(f)
        sizes = args.cache_sizes or [512, 1024]
        table = comparison_table(results, sizes)
        with open(os.path.join(output_dir, "compare_all.md"), "w", encoding="utf-8") as f:
            f.write(table.lstrip() + "\n")
        print(table)
        for path in draw_figures(results, sizes, output_dir):
            print(f"figure: {path}", file=sys.stderr)
    return 0


def _finished(output_dir: str, run, settings: dict) -> bool:
    """True when this run's JSON exists with the same settings; other settings there are an error."""
    import json

    from pyramidkv.predict import CLIError

    label, method, config, _ = run
    path = os.path.join(output_dir, f"{label}.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    mine = json.loads(json.dumps({"method": method, "config": config, "settings": settings}))
    theirs = {"method": old.get("method"), "config": old.get("config"), "settings": old.get("settings")}
    if mine != theirs:
        differ = [k for k in mine["settings"] if mine["settings"][k] != (theirs["settings"] or {}).get(k)]
        raise CLIError(f"{path} holds run {label} with other settings ({', '.join(differ) or 'method config'}); "
                       f"pass another --output_dir or delete it")
    return True


if __name__ == "__main__":
    sys.exit(main())
