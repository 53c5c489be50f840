"""The pyramidkv side of `scripts/compare_kvpress.sh`, plus saving the shared model and the final report.

    python scripts/bench/compare_ours.py save-model DIR
    python scripts/bench/compare_ours.py run --model_path DIR --out ours.json [...]
    python scripts/bench/compare_ours.py report ours.json kvpress.json --out_prefix benchmarks/kvpress_comparison

Method pairs (same model, prompt, kept tokens per layer and KV head):
    kvpress no press (DynamicCache)     <-> pyramidkv FullKV (and transformers' DynamicCache)
    SnapKVPress(window 64, kernel 5)    <-> SnapKV(window_size 64, kernel_size 5, pooling avgpool)
    StreamingLLMPress(n_sink 4)         <-> StreamingLLM(sink_size 4)
    KnormPress                          <-> L2Norm(skip_layers 0, window_size 1)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fix_malloc_threshold, build_model, kv_shape, machine_info  # noqa: E402
from measure import measure_config  # noqa: E402
from report import _mmm  # noqa: E402

PAIRS = {  # kvpress press -> pyramidkv method(s)
    "none": ["FullKV", "DynamicCache"],
    "SnapKVPress": ["SnapKV"],
    "StreamingLLMPress": ["StreamingLLM"],
    "KnormPress": ["L2Norm"],
}


def method_args(method: str, args) -> argparse.Namespace:
    local = copy.copy(args)
    local.pooling = "avgpool"
    local.l2norm_skip_layers = None
    if method == "L2Norm":
        local.window_size, local.l2norm_skip_layers = 1, 0
    elif method == "StreamingLLM":
        local.window_size = 8  # recency either way: sinks + the most recent tokens
    return local


def run(args) -> int:
    torch.set_num_threads(args.threads)
    fix_malloc_threshold()  # same allocator setting as the benchmark (see common.py)
    from tqdm import tqdm

    model = build_model(args.model_path, "tiny", torch.float32, args.device, args.attn_implementation)
    shape = kv_shape(model)
    presses = [n for n in args.presses.split(",") if n]
    records = []
    for context in [int(c) for c in args.context_lengths.split(",")]:
        for press in tqdm(presses, desc=f"pyramidkv ctx={context}", file=sys.stderr):
            for method in PAIRS[press]:
                budget = None if press == "none" else args.budget
                record = measure_config(model, method, context, budget, method_args(method, args), shape)
                record.update(side="pyramidkv", press=press)
                records.append(record)
    with open(args.out, "w") as handle:
        json.dump({"side": "pyramidkv", "machine": machine_info(args.device), "settings": vars(args),
                   "records": records}, handle, indent=1)
    return 0


def report(args) -> int:
    ours = json.load(open(args.ours))
    theirs = json.load(open(args.kvpress))
    lines = ["| context | kvpress press | pyramidkv method | kept/layer/head (kvpress / ours) | prefill ms kvpress "
             "| prefill ms ours | ratio | TPOT ms kvpress | TPOT ms ours | ratio | peak MB kvpress | peak MB ours "
             "| ratio | peak above pre-run RSS MB kvpress | ours | select ms kvpress | select ms ours |",
             "|" + "---|" * 17]
    rows = []
    for k in theirs["records"]:
        for o in ours["records"]:
            if o["press"] != k["method"] or o["context"] != k["context"]:
                continue
            ratio = {m: o[m]["median"] / k[m]["median"] for m in ("ttft_ms", "tpot_ms", "peak_mem_mb")}
            kept = f"{max(k['physical_lengths_prefill'])} / {max(o['physical_lengths_prefill'])}"
            lines.append(
                f"| {k['context']} | {k['method']} | {o['method']} | {kept} | {_mmm(k['ttft_ms'])} | {_mmm(o['ttft_ms'])} "
                f"| {ratio['ttft_ms']:.2f} | {_mmm(k['tpot_ms'], 2)} | {_mmm(o['tpot_ms'], 2)} | {ratio['tpot_ms']:.2f} "
                f"| {_mmm(k['peak_mem_mb'], 0)} | {_mmm(o['peak_mem_mb'], 0)} | {ratio['peak_mem_mb']:.2f} "
                f"| {_mmm(k['peak_mem_above_base_mb'], 0)} | {_mmm(o['peak_mem_above_base_mb'], 0)} "
                f"| {_mmm(k['select_ms'])} | {_mmm(o['select_ms'])} |")
            rows.append({"context": k["context"], "press": k["method"], "method": o["method"],
                         "ratio_ours_over_kvpress": ratio, "kvpress": k, "pyramidkv": o})
    table = "\n".join(lines)
    print(table)
    print("\nratio = pyramidkv / kvpress (medians; < 1 means pyramidkv is faster / smaller)")
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.json", "w") as handle:
        json.dump({"note": args.note, "command": args.command, "kvpress_machine": theirs["machine"],
                   "pyramidkv_machine": ours["machine"], "kvpress_settings": theirs["settings"],
                   "pyramidkv_settings": ours["settings"], "rows": rows, "markdown_table": table}, handle, indent=1)
    with open(f"{prefix}.md", "w") as handle:
        handle.write(f"{table}\n\nratio = pyramidkv / kvpress (medians).\n")
    print(f"wrote {prefix}.json, {prefix}.md")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command_name", required=True)
    save = sub.add_parser("save-model", help="save the benchmark's tiny random Llama to DIR")
    save.add_argument("directory")
    r = sub.add_parser("run", help="measure the pyramidkv methods paired with kvpress presses")
    r.add_argument("--model_path", required=True)
    r.add_argument("--presses", default="none,SnapKVPress,StreamingLLMPress,KnormPress")
    r.add_argument("--context_lengths", default="4096,16384")
    r.add_argument("--budget", type=int, default=256)
    r.add_argument("--window_size", type=int, default=64)
    r.add_argument("--kernel_size", type=int, default=5)
    r.add_argument("--new_tokens", type=int, default=64)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--attn_implementation", default="sdpa")
    r.add_argument("--device", default="cpu")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--out", required=True)
    rep = sub.add_parser("report", help="pair the two JSON files and write the comparison table")
    rep.add_argument("ours")
    rep.add_argument("kvpress")
    rep.add_argument("--out_prefix", required=True)
    rep.add_argument("--note", default="")
    rep.add_argument("--command", default="")
    args = p.parse_args()
    if args.command_name == "save-model":
        model = build_model(None, "tiny", torch.float32, "cpu", "sdpa")
        model.save_pretrained(args.directory)
        print(f"saved the tiny Llama to {args.directory}")
        return 0
    return run(args) if args.command_name == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
