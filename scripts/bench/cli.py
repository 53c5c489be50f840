"""Command line of the efficiency benchmark: flags, checks of their values and where results go.

Standard library only: `scripts/benchmark.py --help` and every check here run before torch,
transformers or pyramidkv is imported (importing torch alone takes seconds), and a bad value is
refused before a model is loaded or built.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# fresh runs go under this git-ignored folder; benchmarks/ (whose files the README tables quote) is
# written only when --out_dir names it
DEFAULT_OUT_ROOT = REPO / "bench_out"
PRESETS = ("tiny", "llama3-8b")
DEFAULT_METHODS = "FullKV,SnapKV,PyramidKV,H2O,StreamingLLM,L2Norm,DynamicCache"
BASELINE = "DynamicCache"  # transformers' default cache, no pyramidkv involved
UNCOMPRESSED = ("FullKV", BASELINE)
PLOT_SUFFIXES = ("_decode_vs_context.png", "_memory_vs_budget.png")


class CLIError(ValueError):
    """A bad flag value or an unusable path, reported as one line `error: ...` (exit status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors as one line too (instead of the usage block + the message)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and appends '(default: ...)' to every flag's help."""


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(prog="benchmark.py", description=description, formatter_class=HelpFormatter)
    p.add_argument("--model_path", default=None,
                   help="a short name (smollm2, tiny), a .gguf file, a checkpoint directory or a hub id; "
                        "unset: random weights of --preset built in code")
    p.add_argument("--preset", default="tiny", choices=PRESETS,
                   help="model shape when --model_path is unset. tiny: Llama, 4 layers, hidden 256, 8 heads, "
                        "2 KV heads, MLP 512, vocab 1024; llama3-8b: Llama-3-8B shape (32 layers, 32/8 heads, "
                        "hidden 4096)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated, case-insensitive; pyramidkv methods plus {BASELINE} "
                        "(transformers' cache, no pyramidkv)")
    p.add_argument("--context_lengths", type=int_list, default="1024,4096,16384",
                   help="comma-separated prompt lengths in tokens")
    p.add_argument("--max_capacity_prompts", type=int_list, default="64,256,1024",
                   help="comma-separated budgets: tokens kept per layer and KV head, window included; each "
                        "must exceed --window_size")
    p.add_argument("--new_tokens", type=int, default=64, help="generated tokens per run, at least 2")
    p.add_argument("--attn_implementation", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                   help="transformers attention implementation")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per configuration, at least 1")
    p.add_argument("--warmup", type=int, default=1, help="discarded runs per configuration, at least 0")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="unset: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, at least 1")
    p.add_argument("--window_size", type=int, default=8, help="observation window (tokens), at least 1")
    p.add_argument("--kernel_size", type=int, default=7, help="pooling kernel of the window's votes, at least 1")
    p.add_argument("--pooling", default="maxpool", choices=("maxpool", "avgpool"), help="pooling of the votes")
    p.add_argument("--l2norm_skip_layers", type=int, default=None,
                   help="L2Norm's uncompressed first layers; unset: the method's default (2)")
    p.add_argument("--method_max_context", default="H2O=4096",
                   help="METHOD=TOKENS,...: run a method only up to that context (H2O scores with the full "
                        "S x S attention of every layer: tens of seconds per 16k prefill on 2 CPU cores); "
                        "'' runs everything everywhere")
    p.add_argument("--target_budget", type=int, default=256, help="budget at which the targets are checked")
    p.add_argument("--no_reference", action="store_true",
                   help="skip the FullKV runs whose prompt is as long as each budget (target 2's reference)")
    p.add_argument("--seed", type=int, default=1, help="prompt seed")
    p.add_argument("--out_dir", default=None,
                   help="folder for <tag>.json/.csv/_*.png; unset: a fresh bench_out/<tag>_<UTC time>/ "
                        "(git-ignored). benchmarks/ is written only when named here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace result files that already exist in --out_dir (refused otherwise)")
    p.add_argument("--tag", default=None, help="output file stem; unset: <device>_<preset or model name>_<attn>")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine state)")
    p.add_argument("--no_plots", action="store_true", help="write no PNG plots")
    p.add_argument("--replot", default=None, metavar="RESULTS_JSON",
                   help="measure nothing: redraw the plots of a results JSON written by this script, next to it "
                        "(or into --out_dir)")
    return p


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """Parsed flags with every value checked and the output folder chosen; CLIError on a bad value."""
    args = build_parser(description).parse_args(argv)
    if args.replot is None:
        check_numbers(args)
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not args.methods:
            raise CLIError("--methods is empty; give e.g. FullKV,SnapKV")
        args.method_max_context = parse_method_limits(args.method_max_context)
        if args.dtype is None:
            args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def check_numbers(args) -> None:
    """Every numeric flag in its valid range; budgets larger than the observation window."""
    at_least = (("--new_tokens", args.new_tokens, 2, "one prefill token + decode steps"),
                ("--repeats", args.repeats, 1, None), ("--warmup", args.warmup, 0, None),
                ("--threads", args.threads, 1, None), ("--window_size", args.window_size, 1, None),
                ("--kernel_size", args.kernel_size, 1, None), ("--target_budget", args.target_budget, 1, None))
    for flag, value, minimum, why in at_least:
        if value < minimum:
            raise CLIError(f"{flag} {value} is invalid: it must be at least {minimum}" + (f" ({why})" if why else ""))
    if args.l2norm_skip_layers is not None and args.l2norm_skip_layers < 0:
        raise CLIError(f"--l2norm_skip_layers {args.l2norm_skip_layers} is invalid: it must be at least 0")
    small = [b for b in args.max_capacity_prompts if b <= args.window_size]
    if small:
        raise CLIError(f"--max_capacity_prompts {small[0]} is invalid: a budget must be larger than --window_size "
                       f"{args.window_size} (it includes the observation window)")
    short = [c for c in args.context_lengths if c <= args.window_size]
    if short:
        raise CLIError(f"--context_lengths {short[0]} is invalid: a prompt must be longer than --window_size "
                       f"{args.window_size}")


def parse_method_limits(text: str) -> dict[str, int]:
    """'H2O=4096,SnapKV=1024' -> {'H2O': 4096, 'SnapKV': 1024} (names canonicalized later)."""
    limits = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, _, tokens = item.partition("=")
        try:
            limit = int(tokens)
        except ValueError:
            limit = 0
        if not name.strip() or limit <= 0:
            raise CLIError(f"--method_max_context item {item!r} is invalid; expected METHOD=TOKENS with TOKENS >= 1")
        limits[name.strip()] = limit
    return limits


def default_tag(args, model_label: str) -> str:
    """<device>_<preset or model name>_<attention>, e.g. cpu_tiny_sdpa, cpu_SmolLM2-135M-Instruct_sdpa."""
    return f"{args.device.split(':')[0]}_{model_label}_{args.attn_implementation}"


def result_paths(out_dir: Path, tag: str, plots: bool) -> list[Path]:
    paths = [out_dir / f"{tag}.json", out_dir / f"{tag}.csv"]
    return paths + ([out_dir / f"{tag}{suffix}" for suffix in PLOT_SUFFIXES] if plots else [])


def choose_out_dir(args, now: datetime | None = None) -> Path:
    """--out_dir, or a fresh bench_out/<tag>_<UTC time>/; refuses a folder under a file and, without
    --overwrite, a folder that already holds this tag's result files."""
    if args.out_dir is None:
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        out_dir = DEFAULT_OUT_ROOT / f"{args.tag}_{stamp}"
    else:
        out_dir = Path(args.out_dir).expanduser()
    check_writable_dir(out_dir, "--out_dir")
    check_not_overwriting(result_paths(out_dir, args.tag, not args.no_plots), args.overwrite)
    return out_dir


def check_writable_dir(out_dir: Path, flag: str) -> None:
    """The nearest existing folder of `out_dir` is a folder we may write into."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{flag} {out_dir} is not usable: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CLIError(f"{flag} {out_dir} is not usable: {parent} is not writable")
            break


def check_not_overwriting(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise CLIError(f"{existing[0]} already exists ({len(existing)} result file(s) of this tag there); "
                       "pass --overwrite to replace them, or another --out_dir / --tag")


def print_error(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2

