"""python -m pyramidkv.ruler: pre-generate RULER data with a model's tokenizer.

Writes {data_dir}/{length}/{task}.jsonl (one sample per line: index, task, input, outputs, length,
depth, answer_prefix, tokens_to_generate, needles) and {task}.meta.json (seed, tokenizer, chat
template, time taken). run_ruler.py --data_dir reads these files instead of generating on the fly.
"""
from __future__ import annotations

import argparse
import os
import sys

from .dataset import write_dataset
from .niah import DEFAULT_DEPTH_ORDER, DEPTH_ORDERS
from .spec import DEFAULT_TASKS, HAYSTACKS, TASKS, haystack_choices, parse_task_list


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bad context length list {text!r}; expected comma-separated integers like 4096,8192") from None
    bad = [x for x in lengths if x < 128]
    if not lengths or bad:
        raise ValueError(f"bad context length(s) {bad or text!r}; each must be an integer >= 128")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    from pyramidkv.models import DEFAULT_MODEL, SHORT_NAMES

    parser = argparse.ArgumentParser(prog="python -m pyramidkv.ruler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=DEFAULT_MODEL,
                        help="the model whose tokens lengths are counted in, named as run_ruler.py's "
                             f"--model_path ({', '.join(SHORT_NAMES)}, a checkpoint or tokenizer dir, a .gguf "
                             f"file, a hub id) (default: {DEFAULT_MODEL}, as run_ruler.py)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma list of {', '.join(TASKS)}; 'all' or 'default' "
                             "(default: the 11 offline tasks)")
    parser.add_argument("--context_lengths", default="4096",
                        help="comma list of target lengths in tokens (default: 4096)")
    parser.add_argument("--num_samples", type=int, default=100, help="samples per task and length (default: 100)")
    parser.add_argument("--seed", type=int, default=42, help="sample seed (default: 42)")
    parser.add_argument("--data_dir", default="data/ruler", help="output root (default: data/ruler)")
    parser.add_argument("--chat_template", default="auto", choices=("auto", "none"),
                        help="auto: wrap each sample in the tokenizer's chat template when it has one (default: auto)")
    parser.add_argument("--haystack", default=None, choices=HAYSTACKS,
                        help="override the haystack of niah/vt tasks (default: RULER's per task)")
    parser.add_argument("--qa_dir", default=None,
                        help="folder holding squad.json / hotpotqa.json for qa_1/qa_2 (default: data/)")
    add_depth_order_arg(parser)
    return parser


def add_depth_order_arg(parser) -> None:
    parser.add_argument("--depth_order", default=DEFAULT_DEPTH_ORDER, choices=tuple(DEPTH_ORDERS),
                        help="depth of sample i's answer needle on RULER's 40-point grid: spread (bit-reversed "
                             "order, the first n samples cover 0-100%%) or sequential (grid order, i mod 40: "
                             "10 samples sit at 0-23%%; tables made before 2026-12-02) (default: spread)")


def load_tokenizer(spec: str):
    """(tokenizer, model name) for --tokenizer: a tokenizer-only dir as is, else what
    pyramidkv.models.resolve_model makes of it (smollm2's tokenizer comes from its GGUF file, or from
    the dequantized copy once one is cached); one-line ValueError for anything that is not a tokenizer."""
    from pyramidkv import models
    from pyramidkv.predict import TOKENIZER_FILES

    path = os.path.expanduser(spec)
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        source, extra, name = path, {}, os.path.basename(os.path.normpath(path))
    else:
        resolved = models.resolve_model(spec)  # one-line ValueError for a missing path or a non-model dir
        cached = models.dequantized_dir(resolved) if resolved.kind == "gguf" else None
        if cached and os.path.isfile(os.path.join(cached, "config.json")):
            source, extra = cached, {}
        elif resolved.kind == "gguf":
            source, extra = os.path.dirname(resolved.path), {"gguf_file": os.path.basename(resolved.path)}
        else:
            source, extra = resolved.path, {}
        name = resolved.name
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source, **extra), name
    except (OSError, ValueError, KeyError, TypeError) as err:  # transformers' messages span lines
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"--tokenizer {spec!r} is not a tokenizer ({first})") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tasks = parse_task_list(args.tasks)
        lengths = parse_lengths(args.context_lengths)
        if args.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
        tokenizer, name = load_tokenizer(args.tokenizer)
        chat = args.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        for length in lengths:
            for task in tasks:
                override = args.haystack if args.haystack in haystack_choices(task) else None
                path, seconds = write_dataset(args.data_dir, task, tokenizer, length, args.num_samples,
                                              args.seed, chat, name, haystack_override=override,
                                              qa_dir=args.qa_dir, depth_order=args.depth_order)
                print(f"{path}: {args.num_samples} samples in {seconds:.1f}s", flush=True)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
