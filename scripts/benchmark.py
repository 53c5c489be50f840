r"""Efficiency benchmark: TTFT, TPOT, throughput, peak memory and KV bytes per method, context and budget.

    python scripts/benchmark.py                       # tiny Llama (4 layers, hidden 256), CPU, sdpa, fp32
    python scripts/benchmark.py --context_lengths 1024 --methods FullKV,SnapKV --repeats 1 --warmup 0
    python scripts/benchmark.py --device cuda --preset llama3-8b --dtype bfloat16 \
        --context_lengths 8192,32768,131072 --attn_implementation flash_attention_2

For each (method, context length, budget): `--warmup` discarded runs, then `--repeats` measured runs of
a manual greedy loop (prefill with compression, then `--new_tokens - 1` decode steps); each metric is
the median over repeats with min-max. Writes <out_dir>/<tag>.json and .csv, two PNG plots, and prints
the table and the issue's four targets (checked at the largest context and `--target_budget`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from common import PRESETS, build_model, fix_malloc_threshold, kv_shape, machine_info  # noqa: E402
from measure import BASELINE, canonical_method, measure_interleaved, plan, torch_dtype  # noqa: E402
from report import check_targets, markdown_table, plot, targets_text, text_table, write_csv, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = "FullKV,SnapKV,PyramidKV,H2O,StreamingLLM,L2Norm,DynamicCache"


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None,
                   help="a local checkpoint directory; default: random weights of --preset built in code")
    p.add_argument("--preset", default="tiny", choices=PRESETS,
                   help="tiny: Llama, 4 layers, hidden 256, 8 heads, 2 KV heads, MLP 512, vocab 1024; "
                        "llama3-8b: Llama-3-8B shape (32 layers, 32/8 heads, hidden 4096)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated; pyramidkv methods plus {BASELINE} (transformers' cache, no "
                        f"pyramidkv). Default: {DEFAULT_METHODS}")
    p.add_argument("--context_lengths", type=int_list, default=[1024, 4096, 16384], help="default 1024,4096,16384")
    p.add_argument("--max_capacity_prompts", type=int_list, default=[64, 256, 1024],
                   help="budgets (tokens per layer and KV head, window included); default 64,256,1024")
    p.add_argument("--new_tokens", type=int, default=64, help="generated tokens per run (default 64)")
    p.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    p.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs per configuration (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--window_size", type=int, default=8)
    p.add_argument("--kernel_size", type=int, default=7)
    p.add_argument("--pooling", default="maxpool", choices=("maxpool", "avgpool"))
    p.add_argument("--l2norm_skip_layers", type=int, default=None,
                   help="L2Norm's uncompressed first layers (method default 2)")
    p.add_argument("--method_max_context", default="H2O=4096",
                   help="METHOD=TOKENS,...: run a method only up to that context; default H2O=4096 (H2O scores "
                        "with the full S x S attention of every layer: tens of seconds per 16k prefill on 2 CPU "
                        "cores); pass '' to run everything everywhere")
    p.add_argument("--target_budget", type=int, default=256, help="budget at which the targets are checked")
    p.add_argument("--no_reference", action="store_true",
                   help="skip the FullKV runs whose prompt is as long as each budget (target 2's reference)")
    p.add_argument("--seed", type=int, default=1, help="prompt seed")
    p.add_argument("--out_dir", default=str(REPO / "benchmarks"))
    p.add_argument("--tag", default=None, help="output file stem (default: <device>_<preset>_<attn>)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine state)")
    p.add_argument("--no_plots", action="store_true")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new_tokens must be at least 2 (one prefill token + decode steps)")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    try:
        args.methods = list(dict.fromkeys(canonical_method(m) for m in args.methods.split(",") if m.strip()))
    except ValueError as error:
        p.error(str(error))
    try:
        limits = [item.split("=") for item in args.method_max_context.split(",") if item.strip()]
        args.method_max_context = {canonical_method(name): int(limit) for name, limit in limits}
    except ValueError as error:
        p.error(f"--method_max_context {args.method_max_context!r}: {error} (expected METHOD=TOKENS,...)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_fixed = not args.device.startswith("cuda") and fix_malloc_threshold()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))
    model = build_model(args.model_path, args.preset, torch_dtype(args.dtype), args.device, args.attn_implementation)
    shape = kv_shape(model)
    configs = plan(args.methods, args.context_lengths, args.max_capacity_prompts, not args.no_reference)
    configs = [c for c in configs if c[1] <= args.method_max_context.get(c[0], c[1])]
    info = machine_info(args.device)
    model_name = args.model_path or f"{args.preset} (random weights)"
    title = (f"{model_name}, {args.dtype}, {args.attn_implementation}, {args.device}, "
             f"{args.threads} threads, {args.new_tokens} new tokens")
    print(f"# pyramidkv efficiency benchmark — {title}")
    print(f"# model: {shape['layers']} layers, {shape['kv_heads']} KV heads, head_dim {shape['head_dim']}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    print(f"# {len(configs)} configurations; each: {args.warmup} warm-up + {args.repeats} measured runs; "
          "medians [min-max] over runs; TPOT = median over a run's decode steps; peak memory = "
          + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
             "process RSS high-water mark, reset before each run"
             + (" (glibc mmap threshold fixed at 128 KiB)" if malloc_fixed else "")))
    print("# order: per context length, every configuration's warm-up, then the repeats in interleaved rounds; "
          "the reference runs (prompt = budget) are interleaved with the longest context")
    print(f"# machine: {info.get('cpu', '?')} ({info['cpu_count']} CPUs), load average {info['loadavg_start']}")
    from tqdm import tqdm

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{args.device.split(':')[0]}_{args.preset if not args.model_path else 'model'}_{args.attn_implementation}"
    payload = {
        "command": command,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "note": args.note,
        "model": model_name,
        "model_shape": shape,
        "settings": {k: v for k, v in vars(args).items() if k not in ("note",)},
        "machine": info,
        "method_of_measurement": {
            "warmup_runs": args.warmup, "measured_runs": args.repeats,
            "order": "per context length: every configuration's warm-up, then `repeats` interleaved rounds; "
                     "reference runs (prompt = budget) interleaved with the longest context",
            "glibc_mmap_threshold_fixed_128KiB": malloc_fixed,
            "ttft": "prefill forward incl. compression + argmax, perf_counter (cuda: synchronized)",
            "tpot": "median of per-step decode forward times within a run; then median/min/max over runs",
            "throughput": "new_tokens / (TTFT + sum of decode steps)",
            "peak_memory": None,
            "selection": "sum over layers of CompressedCache.compress_layer during the timed prefill",
        },
        "complete": False,
        "elapsed_s": 0.0,
        "records": [],
    }
    records = payload["records"]
    started = time.perf_counter()
    # same prompt length -> measured in interleaved rounds; the reference runs (uncompressed, prompt as
    # long as a budget) join the longest context's group, so target 2's ratio pairs runs measured in
    # the same minutes (the machine's speed drifts by tens of percent over a benchmark)
    groups: dict[int, list[tuple]] = {}
    longest = max(args.context_lengths)
    for config in configs:
        groups.setdefault(config[1] if config[1] in args.context_lengths else longest, []).append(config)

    with tqdm(total=len(configs) * (args.warmup + args.repeats), unit="run", file=sys.stderr) as bar:
        def progress(runner):
            bar.set_description(f"ctx={runner.context} {runner.method} budget={runner.budget or '-'}")
            bar.update()

        for group in groups.values():
            records.extend(measure_interleaved(model, group, args, shape, progress))
            payload["elapsed_s"] = time.perf_counter() - started
            write_json(payload, out_dir / f"{tag}.json")  # partial results survive an interrupted run
    order = {config: i for i, config in enumerate(configs)}
    records.sort(key=lambda r: order[(r["method"], r["context"], r["budget"])])
    info["loadavg_end"] = os.getloadavg()

    print()
    print(text_table(records))
    checks = check_targets(records, args.target_budget)
    if checks:
        print()
        print(targets_text(checks))
    payload["method_of_measurement"]["peak_memory"] = records[0]["memory_kind"] if records else None
    payload.update(complete=True, targets=checks, markdown_table=markdown_table(records))
    write_json(payload, out_dir / f"{tag}.json")
    write_csv(records, out_dir / f"{tag}.csv")
    written = [out_dir / f"{tag}.json", out_dir / f"{tag}.csv"]
    if not args.no_plots:
        written += plot(records, out_dir / tag, title)
    print(f"\n# {payload['elapsed_s']:.0f} s; wrote: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
