r"""Efficiency benchmark: TTFT, TPOT, throughput, peak memory and KV bytes per method, context and budget.

    python scripts/benchmark.py                       # tiny Llama (4 layers, hidden 256), CPU, sdpa, fp32
    python scripts/benchmark.py --context_lengths 1024 --methods FullKV,SnapKV --repeats 1 --warmup 0
    python scripts/benchmark.py --device cuda --preset llama3-8b --dtype bfloat16 \
        --context_lengths 8192,32768,131072 --attn_implementation flash_attention_2

For each (method, context length, budget): `--warmup` discarded runs, then `--repeats` measured runs of
a manual greedy loop (prefill with compression, then `--new_tokens - 1` decode steps); each metric is
the median over repeats with min-max. Writes <out_dir>/<tag>.json and .csv, two PNG plots, and prints
the table and the issue's four targets (checked at the largest context and `--target_budget`).

Output: a fresh bench_out/<tag>_<UTC time>/ (git-ignored) unless --out_dir names a folder; an existing
result file there is replaced only with --overwrite (benchmarks/ holds the files the README quotes).
    python scripts/benchmark.py --replot benchmarks/cpu_tiny_sdpa.json --overwrite   # redraw its PNGs
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

# only the standard library before the flags are checked: torch, transformers and pyramidkv are
# imported in main() once the command line is known to be good (--help stays instant)
from cli import BASELINE, PLOT_SUFFIXES, CLIError, check_not_overwriting, choose_out_dir, default_tag  # noqa: E402
from cli import parse_args, print_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def resolve_model_arg(spec: str | None):
    """What --model_path names, through pyramidkv.models (short names smollm2 / tiny, a .gguf file, a
    checkpoint dir, an org/name hub id); None = random weights of --preset. Nothing is loaded."""
    if spec is None:
        return None
    from pyramidkv import models

    try:
        return models.resolve_model(spec)
    except ValueError as error:
        raise CLIError(f"--model_path: {error}") from None


def load_model(args, resolved):
    """The model to measure: random weights of --preset, or the resolved checkpoint (a GGUF model via
    its dequantized cached copy) converted to --dtype on --device."""
    from common import build_model
    from measure import torch_dtype

    dtype = torch_dtype(args.dtype)
    if resolved is None:
        return build_model(None, args.preset, dtype, args.device, args.attn_implementation)
    from pyramidkv import models

    try:
        path, gguf_file = models.local_checkpoint(resolved, log=lambda m: print(m, file=sys.stderr, flush=True))
        return build_model(path, args.preset, dtype, args.device, args.attn_implementation, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as error:  # transformers' messages span lines: keep the first
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CLIError(f"cannot load --model_path {args.model_path!r} ({resolved.describe()}): {first}") from error


def prepare(args) -> list[tuple]:
    """Canonical method names, every configuration's method settings built once, the device checked:
    the (method, context, budget) plan, or CLIError; nothing heavy is loaded yet."""
    import torch
    from measure import canonical_method, method_settings, plan

    import pyramidkv

    try:
        args.methods = list(dict.fromkeys(canonical_method(m) for m in args.methods))
    except ValueError as error:
        raise CLIError(f"--methods: {error}; the benchmark also takes {BASELINE}") from None
    try:
        args.method_max_context = {canonical_method(m): t for m, t in args.method_max_context.items()}
    except ValueError as error:
        raise CLIError(f"--method_max_context: {error}") from None
    configs = plan(args.methods, args.context_lengths, args.max_capacity_prompts, not args.no_reference)
    configs = [c for c in configs if c[1] <= args.method_max_context.get(c[0], c[1])]
    for method, context, budget in configs:
        if method == BASELINE:
            continue
        try:
            pyramidkv.build_method(method, **method_settings(method, budget or context, args))
        except (TypeError, ValueError) as error:
            raise CLIError(f"{method} at context {context}, budget {budget or context}: {error}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but torch.cuda.is_available() is False; use --device cpu")
    return configs


def replot(args) -> int:
    """Redraw the PNGs of a results JSON (next to it, or into --out_dir); measures nothing."""
    from plots import plot

    source = Path(args.replot)
    try:
        payload = json.loads(source.read_text(encoding="utf-8"))
        records, settings, model = payload["records"], payload["settings"], payload["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CLIError(f"--replot {source}: not a results JSON of this script ({error})") from None
    if not records:
        raise CLIError(f"--replot {source}: the file holds no records")
    prefix = (Path(args.out_dir) if args.out_dir else source.parent) / source.stem
    check_not_overwriting([Path(f"{prefix}{suffix}") for suffix in PLOT_SUFFIXES], args.overwrite)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    print("# wrote: " + ", ".join(str(p) for p in plot(records, prefix, settings, model)))
    return 0


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    try:
        args = parse_args(argv, __doc__)
        if args.replot:
            return replot(args)
        resolved = resolve_model_arg(args.model_path)
        configs = prepare(args)
        args.tag = args.tag or default_tag(args, resolved.name if resolved else args.preset)
        out_dir = choose_out_dir(args)
        return run(args, configs, resolved, out_dir, argv)
    except CLIError as error:
        return print_error(error)


def run(args, configs: list[tuple], resolved, out_dir: Path, argv) -> int:
    import torch
    from common import fix_malloc_threshold, kv_shape, machine_info
    from measure import measure_interleaved
    from plots import plot, title_of
    from report import check_targets, markdown_table, targets_text, text_table, write_csv, write_json

    torch.set_num_threads(args.threads)
    malloc_fixed = not args.device.startswith("cuda") and fix_malloc_threshold()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))
    model = load_model(args, resolved)
    shape = kv_shape(model)
    info = machine_info(args.device)
    model_name = resolved.name if resolved else f"{args.preset} (random weights)"
    title = title_of(model_name, vars(args))
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

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag
    payload = {
        "command": command,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "note": args.note,
        "model": model_name,
        "model_source": resolved.describe() if resolved else f"random weights of --preset {args.preset}",
        "model_fingerprint": resolved.fingerprint() if resolved else None,
        "model_shape": shape,
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("note", "replot")}, "out_dir": str(out_dir)},
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
        written += plot(records, out_dir / tag, payload["settings"], model_name)
    print(f"\n# {payload['elapsed_s']:.0f} s; wrote: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
