"""The kvpress side of `scripts/compare_kvpress.sh` — runs in kvpress's own virtualenv (transformers < 5.3).

kvpress is used as an installed package (`pip install kvpress==0.5.5`), nothing of it is copied here.
The loop mirrors kvpress's own pipeline: prefill inside `with press(model):` on a DynamicCache, then a
manual greedy decode loop with explicit position_ids (the compressed DynamicCache no longer knows the
true length). The selection cost is `press.compress` timed in place, summed over layers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import aggregate, build_model, fix_malloc_threshold, machine_info, make_prompt, release_memory, run_repeats  # noqa: E402
from common import synchronizer, timed, timed_generation  # noqa: E402


def make_press(name: str, ratio: float, args):
    import kvpress

    if name == "none":
        return None
    if name == "SnapKVPress":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=args.window_size, kernel_size=args.kernel_size)
    if name == "StreamingLLMPress":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=args.sink_size)
    if name == "KnormPress":
        return kvpress.KnormPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}")


def measure(model, press_name: str, context: int, budget: int, args) -> dict:
    from transformers import DynamicCache

    sync = synchronizer(args.device)
    input_ids = make_prompt(context, model.config.vocab_size, args.device, seed=args.seed)
    # kvpress keeps int(k_len * (1 - ratio)) tokens; the +0.5 keeps float rounding from dropping one
    ratio = 0.0 if press_name == "none" else 1.0 - (budget + 0.5) / context

    def one_run():
        select_s: list[float] = []
        press = make_press(press_name, ratio, args)
        if press is None:
            scope = contextlib.nullcontext
        else:
            press.compress = timed(press.compress, select_s, sync)

            def scope():
                return press(model)

        result = timed_generation(model, input_ids, args.new_tokens, DynamicCache(), scope,
                                  contextlib.nullcontext, explicit_positions=True, sync=sync)
        result["select_s"] = select_s
        return result

    release_memory(args.device)
    runs = run_repeats(one_run, args.warmup, args.repeats, args.device)
    record = {"side": "kvpress", "method": press_name, "context": context,
              "budget": None if press_name == "none" else budget, "compression_ratio": ratio}
    record.update(aggregate(runs, args.new_tokens))
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--presses", default="none,SnapKVPress,StreamingLLMPress,KnormPress")
    p.add_argument("--context_lengths", default="4096,16384")
    p.add_argument("--budget", type=int, default=256, help="kept tokens per layer and head")
    p.add_argument("--window_size", type=int, default=64)
    p.add_argument("--kernel_size", type=int, default=5)
    p.add_argument("--sink_size", type=int, default=4)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fix_malloc_threshold()  # same allocator setting as the benchmark (see common.py)
    import kvpress
    from tqdm import tqdm

    model = build_model(args.model_path, "tiny", torch.float32, args.device, args.attn_implementation)
    contexts = [int(c) for c in args.context_lengths.split(",")]
    presses = [n for n in args.presses.split(",") if n]
    records = []
    for context in contexts:
        for name in tqdm(presses, desc=f"kvpress ctx={context}", file=sys.stderr):
            records.append(measure(model, name, context, args.budget, args))
    info = machine_info(args.device)
    info["kvpress"] = getattr(kvpress, "__version__", None) or _version("kvpress")
    with open(args.out, "w") as handle:
        json.dump({"side": "kvpress", "machine": info, "settings": vars(args), "records": records}, handle, indent=1)
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
