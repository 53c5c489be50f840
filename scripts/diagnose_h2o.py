"""Why does H2O (prefill form) score 0 on RULER needles where SnapKV scores 100? Over `--n` prompts: the
answers of FullKV / each method, and per layer how much of the question (the prompt's last
`--question_tokens` tokens before the observation window) and of the first quarter of the prompt each
method keeps. H2O's score is attention summed over ALL prompt queries, so token j collects mass from
S - j queries: early tokens win, the question (seen by few queries) loses.

    python scripts/diagnose_h2o.py --task niah_single_1 --length 4096 --budget 1024 --n 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pyramidkv.ruler.__main__ import add_depth_order_arg  # no torch: --help stays fast


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", default="smollm2")
    p.add_argument("--task", default="niah_single_1", help="RULER niah task")
    p.add_argument("--length", type=int, default=4096, help="total tokens per prompt")
    p.add_argument("--n", type=int, default=5, help="prompts")
    p.add_argument("--seed", type=int, default=42, help="RULER generation seed")
    add_depth_order_arg(p)
    p.add_argument("--budget", type=int, default=1024, help="max_capacity_prompt")
    p.add_argument("--methods", default="H2O,SnapKV", help="comma list of methods (window 8 each)")
    p.add_argument("--question_tokens", type=int, default=60, help="prompt tail counted as the question")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default=None, help="JSON output (default: bench_out/diagnose_h2o_<task>_<length>_<budget>.json)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    methods = args.methods.split(",")
    if args.n < 1 or args.budget <= 8 or args.question_tokens <= 8:
        raise SystemExit(f"error: --n {args.n} >= 1, --budget {args.budget} > 8 and --question_tokens "
                         f"{args.question_tokens} > 8 (the window) are required")
    import torch
    from tqdm import tqdm
    from pyramidkv import build_method, models
    from pyramidkv.ruler import generate_sample
    from pyramidkv.shared_prefill import generate_many, record_prefill

    for name in methods:  # one-line errors before loading
        build_method(name, max_capacity_prompt=args.budget)
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_pretrained(models.resolve_model(args.model_path), torch.float32, "sdpa")
    layers = model.config.num_hidden_layers
    question = {m: [0.0] * layers for m in methods}
    early = {m: [0.0] * layers for m in methods}
    correct = {m: 0 for m in ["FullKV"] + methods}
    answers = []
    for index in tqdm(range(args.n), desc="prompts"):
        sample = generate_sample(args.task, tokenizer, args.length, index, args.seed, chat_template=True,
                                 depth_order=args.depth_order)
        enc = tokenizer([sample["input"]], return_tensors="pt", add_special_tokens=False)
        length = enc.input_ids.shape[1]
        kw = {"pad_token_id": tokenizer.pad_token_id, "do_sample": False}
        records, first = record_prefill(model, enc.input_ids, enc.attention_mask, **kw)
        runs = [("FullKV", {})] + [(m, {"max_capacity_prompt": args.budget}) for m in methods]
        outs = generate_many(model, enc.input_ids, enc.attention_mask, sample["tokens_to_generate"], runs, kw,
                             recorded=(records, first))
        texts = {name: tokenizer.decode(o[0], skip_special_tokens=True) for (name, _), o in zip(runs, outs)}
        for name, text in texts.items():
            correct[name] += all(v in text for v in sample["outputs"])
        answers.append(texts)
        for x in records:
            for name in methods:
                keep = build_method(name, max_capacity_prompt=args.budget).select(x, args.budget)
                # None: the budget covers the prompt, every token stays
                keep = torch.arange(length).expand(x.keys.shape[1], length) if keep is None else keep[0]  # [heads, K]
                tail = ((keep >= length - args.question_tokens) & (keep < length - 8)).float().sum(-1)
                question[name][x.layer_idx] += tail.mean().item() / (args.question_tokens - 8) / args.n
                early[name][x.layer_idx] += (keep < length // 4).float().mean().item() / args.n
        del records
    summary = {"args": vars(args), "accuracy": {k: 100.0 * v / args.n for k, v in correct.items()},
               "question_kept_share": question, "first_quarter_share_of_kept": early, "answers": answers}
    out = args.out or os.path.join("bench_out", f"diagnose_h2o_{args.task}_{args.length}_{args.budget}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print("accuracy: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["accuracy"].items()))
    print("| layer | " + " | ".join(f"{m} question kept % | {m} kept in first quarter %" for m in methods) + " |")
    print("|---|" + "---|---|" * len(methods))
    for layer in range(layers):
        cells = " | ".join(f"{100 * question[m][layer]:.0f} | {100 * early[m][layer]:.0f}" for m in methods)
        print(f"| {layer} | {cells} |")
    mean = lambda v: 100 * sum(v) / len(v)  # noqa: E731
    print("| mean | " + " | ".join(f"{mean(question[m]):.0f} | {mean(early[m]):.0f}" for m in methods) + " |")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
