"""KV bytes held after prefill, per method and budget, for a model's KV shape (the memory column of a
results table).

    python scripts/kv_bytes_report.py --shape smollm2 --length 4096 \
        --methods FullKV,SnapKV,H2O,StreamingLLM,SimCalKV,KeepKV,PyramidInfer,CaM --keep_ratios 0.1,0.25,0.5 \
        --out benchmarks/ruler_smollm2/merging/kv_bytes_4096.json

What a cache holds after prefill depends on the KV shape (layers, KV heads, head_dim, dtype), the
prompt length and the method's budget rule (a per-layer schedule, a logit bias per merged slot), not on
the weights. So the prefill runs on a random-weight Llama with the shape of --shape (a small hidden
size and MLP keep it fast on CPU) over random token ids, and reports each cache's `nbytes()` — the
number the tests check against each storage's formula — next to FullKV's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SHAPES = {  # layers, query heads, KV heads, head_dim of the models the tables are made on
    "smollm2": (30, 9, 3, 64),
    "tiny": (2, 8, 2, 32),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES), help="KV shape (default: smollm2)")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (default: 4096)")
    p.add_argument("--methods", default="FullKV,SnapKV,H2O,StreamingLLM,SimCalKV,KeepKV,PyramidInfer,CaM",
                   help="comma list of methods (default: the merging table's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep_ratios", default=None, help="comma list of keep_ratio budgets")
    g.add_argument("--max_capacity_prompts", default=None, help="comma list of token budgets")
    p.add_argument("--window_size", type=int, default=8, help="observation window (default: 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    return p


def budgets_of(args) -> list[dict]:
    """The budgets as method settings; ValueError (from int / float) names a bad entry."""
    if args.max_capacity_prompts:
        return [{"max_capacity_prompt": int(b)} for b in args.max_capacity_prompts.split(",")]
    return [{"keep_ratio": float(r)} for r in (args.keep_ratios or "0.1,0.25,0.5").split(",")]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.length < 16:
        print(f"error: --length {args.length} must be at least 16", file=sys.stderr)
        return 2
    try:
        budgets = budgets_of(args)
    except ValueError as err:
        print(f"error: bad budget list: {err}", file=sys.stderr)
        return 2
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyramidkv

    methods = [pyramidkv.canonical_name(m) for m in args.methods.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    layers, heads, kv_heads, head_dim = SHAPES[args.shape]
    config = LlamaConfig(hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=256,
                         max_position_embeddings=max(8192, args.length + 8))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, args.length), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in methods:
        for budget in ([{}] if method == "FullKV" else budgets):
            settings = {**budget, "window_size": args.window_size} if budget else {}
            with pyramidkv.compress(model, method, **settings), torch.no_grad():
                out = model(ids, use_cache=True)
                nbytes = out.past_key_values.nbytes()
            rows.append({"method": method, **budget, "nbytes": nbytes})
            print(f"{method} {budget or 'all'}: {nbytes} B", file=sys.stderr)
    full = next((r["nbytes"] for r in rows if r["method"] == "FullKV"), None)
    for row in rows:
        row["vs_fullkv"] = None if not full else round(row["nbytes"] / full, 4)
    report = {"shape": args.shape, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "float32",
              "prompt_tokens": args.length, "window_size": args.window_size, "rows": rows}
    print("| method | budget | KV bytes | vs FullKV |\n|---|---|---|---|")
    for row in rows:
        budget = row.get("keep_ratio", row.get("max_capacity_prompt", "all"))
        print(f"| {row['method']} | {budget} | {row['nbytes']:,} | {row['vs_fullkv']} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
