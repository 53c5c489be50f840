"""Which needle tokens does each layer keep, and why? A diagnosis over many RULER prompts.

    python scripts/diagnose_needle.py --task niah_single_2 --length 2048 --n 20 --budget 512

For every prompt the model's prefill is recorded once (pyramidkv.shared_prefill); then, per layer and
KV head, each configuration (method, window, kernel, budget) selects its kept set from the same
post-RoPE queries and keys. Reported per layer: the share of the needle's value tokens kept; per value
token index (first digit, second, ...): how often it is kept, and its rank by raw window votes (before
pooling); and the Spearman correlation between key L2 norm and attention received from all prompt
queries (the premise of L2Norm). Writes a JSON with everything and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pyramidkv.ruler.__main__ import add_depth_order_arg  # no torch: --help stays fast

DEFAULT_CONFIGS = ("SnapKV:w8:k7", "SnapKV:w8:k1", "SnapKV:w32:k7", "ChunkKV:w8:c10", "PyramidKV:w8:k7")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="smollm2", help="model (default: smollm2)")
    p.add_argument("--task", default="niah_single_2", help="RULER niah task (default: niah_single_2)")
    p.add_argument("--length", type=int, default=2048, help="total tokens per prompt (default: 2048)")
    p.add_argument("--n", type=int, default=20, help="prompts (default: 20)")
    p.add_argument("--seed", type=int, default=42, help="RULER generation seed (default: 42)")
    add_depth_order_arg(p)
    p.add_argument("--budget", type=int, default=512, help="max_capacity_prompt for every config (default: 512)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma list of METHOD:wW:kK (kernel) or ChunkKV:wW:cC (chunk size); AdaKV also "
                        "takes fN (floor_fraction N%%, e.g. AdaKV:w8:k7:f20) "
                        f"(default: {','.join(DEFAULT_CONFIGS)})")
    p.add_argument("--out", default=None, help="JSON output (default: bench_out/diagnose_<task>_<length>_<budget>.json)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--answers", action="store_true",
                   help="also decode each config's answer (RULER's tokens_to_generate, from the same prefill) "
                        "and report accuracy and how many leading value digits it reproduces (default: off)")
    return p


def parse_config(text: str) -> tuple[str, dict]:
    method, *parts = text.split(":")
    config = {}
    for part in parts:
        key = {"w": "window_size", "k": "kernel_size", "c": "chunk_size", "f": "floor_fraction"}.get(part[:1])
        if key is None or not part[1:].isdigit():
            raise ValueError(f"config part {part!r} in {text!r}: use wN, kN, cN or fN")
        config[key] = int(part[1:]) / 100 if key == "floor_fraction" else int(part[1:])
    return method, config


def needle_token_positions(tokenizer, prompt: str, values: list[str]) -> list[list[int]]:
    """Token indices covering each value's characters in the prompt, in order."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for value in values:
        start = prompt.find(value)
        if start < 0:
            raise ValueError(f"value {value!r} not in the prompt")
        end = start + len(value)
        spans.append([i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a])
    return spans


def spearman(a, b):
    import torch
    ra = a.argsort(-1).argsort(-1).float()
    rb = b.argsort(-1).argsort(-1).float()
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def main(argv=None):
    args = build_parser().parse_args(argv)
    configs = [parse_config(c) for c in args.configs.split(",")]
    import torch
    from pyramidkv import build_method, metrics, models
    from pyramidkv.methods.adakv import PerHeadSnapKV
    from pyramidkv.methods.base import group_mean, window_attention
    from pyramidkv.ruler import generate_sample
    from pyramidkv.shared_prefill import generate_many, record_prefill
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    for method, config in configs:  # one-line errors before loading
        build_method(method, max_capacity_prompt=args.budget, **config)
    model, tokenizer = models.load_pretrained(models.resolve_model(args.model_path), torch.float32, "sdpa")
    names = [c for c in args.configs.split(",")]
    layers = model.config.num_hidden_layers
    kept = {name: [[] for _ in range(layers)] for name in names}  # per layer: list of [value tokens] bools
    vote_rank = [[] for _ in range(layers)]  # per layer: ranks (0 = most voted) of each value token, w8
    norm_corr = [[] for _ in range(layers)]
    answers = {name: [] for name in ["FullKV"] + names}  # per config: (correct, leading digits reproduced)
    for index in tqdm(range(args.n), desc="prompts"):
        sample = generate_sample(args.task, tokenizer, args.length, index, args.seed, chat_template=True,
                                 depth_order=args.depth_order)
        spans = needle_token_positions(tokenizer, sample["input"], sample["outputs"])
        enc = tokenizer([sample["input"]], return_tensors="pt", add_special_tokens=False)
        gen_kwargs = {"pad_token_id": tokenizer.pad_token_id, "do_sample": False}
        records, first = record_prefill(model, enc.input_ids, enc.attention_mask, **gen_kwargs)
        positions = torch.tensor(spans[0])
        if args.answers:
            runs = [("FullKV", {})] + [(m, dict(c, max_capacity_prompt=args.budget)) for m, c in configs]
            outs = generate_many(model, enc.input_ids, enc.attention_mask, sample["tokens_to_generate"], runs,
                                 gen_kwargs, recorded=(records, first))
            value = sample["outputs"][0]
            for name, tokens in zip(answers, outs):
                pred = tokenizer.decode(tokens[0], skip_special_tokens=True)
                answers[name].append((value in pred, metrics.leading_digits(pred, value)))
        budgets = {name: build_method(m, max_capacity_prompt=args.budget, **c).layer_budgets(enc.input_ids.shape[1], layers)
                   for name, (m, c) in zip(names, configs)}
        for x in records:
            layer = x.layer_idx
            for name, (method, config) in zip(names, configs):
                budget = budgets[name][layer]  # PyramidKV: its own per-layer budget
                built = build_method(method, max_capacity_prompt=args.budget, **config)
                if isinstance(built, PerHeadSnapKV):  # per-head storage: a slot counts where its head holds it
                    bias = built.compress(x, budget)[2]
                    held = (x.kept_indices[0][:, :, None] == positions[None, None, :]) & (bias[0][:, :, None] == 0)
                    hit = held.any(1)
                else:
                    keep = built.select(x, budget)
                    hit = (keep[0][:, :, None] == positions[None, None, :]).any(1)  # [heads, value tokens]
                kept[name][layer].extend(hit.float().tolist())
            votes = group_mean(window_attention(x, 8).sum(2), x.num_kv_groups)[0, :, : x.seq_len - 8]
            ranks = (-votes).argsort(-1).argsort(-1)[:, positions]  # [heads, value tokens]
            vote_rank[layer].extend(ranks.tolist())
            received = build_method("H2O", max_capacity_prompt=args.budget).score(x, 0)  # [1, Hq, S]
            received = group_mean(received, x.num_kv_groups)[0]
            norms = x.keys[0].float().norm(dim=-1)
            norm_corr[layer].extend(spearman(-norms, received).tolist())  # low norm ~ high attention?
        del records
    summary = summarize(args, names, kept, vote_rank, norm_corr)
    if args.answers:
        summary["answers"] = {name: {"accuracy": round(100 * sum(c for c, _ in rows) / len(rows), 1),
                                     "leading_digits_histogram": {d: sum(1 for _, l in rows if l == d)
                                                                  for d in range(8)}}
                              for name, rows in answers.items()}
    out = args.out or os.path.join("bench_out", f"diagnose_{args.task}_{args.length}_{args.budget}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print_tables(summary)
    print(f"wrote {out}", file=sys.stderr)


def summarize(args, names, kept, vote_rank, norm_corr):
    import statistics as st
    per_layer = []
    for layer in range(len(vote_rank)):
        row = {"layer": layer}
        for name in names:
            rows = kept[name][layer]
            row[name] = round(100 * st.mean(v for r in rows for v in r), 1)
        row["norm_attention_spearman"] = round(st.mean(norm_corr[layer]), 3)
        per_layer.append(row)
    digits = len(kept[names[0]][0][0])
    per_token = []
    for j in range(digits):
        row = {"value_token": j}
        for name in names:
            row[name] = round(100 * st.mean(r[j] for layer in kept[name] for r in layer), 1)
        row["median_vote_rank_w8"] = st.median(r[j] for layer in vote_rank for r in layer)
        per_token.append(row)
    return {"args": vars(args), "configs": names, "per_layer": per_layer, "per_value_token": per_token}


def print_tables(summary):
    names = summary["configs"]
    if "answers" in summary:
        print("| config | accuracy % | answers reproducing the first 0..7 value digits |")
        print("|---|---|---|")
        for name, row in summary["answers"].items():
            hist = " / ".join(str(v) for v in row["leading_digits_histogram"].values())
            print(f"| {name} | {row['accuracy']} | {hist} |")
        print()
    print("| layer | " + " | ".join(f"{n} kept %" for n in names) + " | ρ(−‖k‖, attention) |")
    print("|---" * (len(names) + 2) + "|")
    for row in summary["per_layer"]:
        print(f"| {row['layer']} | " + " | ".join(str(row[n]) for n in names)
              + f" | {row['norm_attention_spearman']} |")
    print()
    print("| value token | " + " | ".join(f"{n} kept %" for n in names) + " | median vote rank (w8) |")
    print("|---" * (len(names) + 2) + "|")
    for row in summary["per_value_token"]:
        print(f"| {row['value_token']} | " + " | ".join(str(row[n]) for n in names)
              + f" | {row['median_vote_rank_w8']} |")


if __name__ == "__main__":
    main()
