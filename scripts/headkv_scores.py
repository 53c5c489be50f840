"""Head importance scores for HeadKV (retrieval heads), from our RULER needle prompts.

    python scripts/headkv_scores.py --model_path smollm2 --n 16 --length 2048 \
        --out pyramidkv/reference/headkv/SmolLM2-135M-Instruct.json

Procedure (the retrieval score of Wu et al.'s retrieval heads, which HeadKV allocates by): for each
needle prompt (RULER niah task, chat template, the prompt ends with the answer prefix) the model
decodes greedily with the full cache (prefill with sdpa), one token at a time with its attention weights
(eager). At a
step whose generated token is one of the needle value's tokens, a query head scores a hit when its
most attended prompt position lies inside the needle value and holds that same token (the head copies
it). A head's score = hits / needle value tokens, averaged over prompts. Written per query head,
[layers][query heads]; HeadKV averages each GQA group to its KV head.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pyramidkv.ruler.__main__ import add_depth_order_arg  # no torch: --help stays fast
import time


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="smollm2", help="model (default: smollm2)")
    p.add_argument("--task", default="niah_single_2", help="RULER niah task (default: niah_single_2)")
    p.add_argument("--length", type=int, default=2048, help="total tokens per prompt (default: 2048)")
    p.add_argument("--n", type=int, default=16, help="prompts (default: 16)")
    p.add_argument("--seed", type=int, default=7, help="RULER generation seed (default: 7)")
    add_depth_order_arg(p)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    return p


def value_token_positions(tokenizer, prompt: str, value: str) -> list[int]:
    """Token indices of the prompt that cover the needle value's characters."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    start = prompt.find(value)
    if start < 0:
        raise ValueError(f"needle value {value!r} is not in the prompt")
    end = start + len(value)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]


def score_prompt(model, input_ids, positions: list[int], steps: int):
    """Hits [layers, query heads] of one prompt, and the number of needle value tokens."""
    import torch

    needle = set(input_ids[0, positions].tolist())
    hits = torch.zeros(model.config.num_hidden_layers, model.config.num_attention_heads)
    inside = torch.zeros(input_ids.shape[1], dtype=torch.bool)
    inside[positions] = True
    with torch.no_grad():
        model.set_attn_implementation("sdpa")  # the prefill needs no weights: the fast kernel
        out = model(input_ids[:, :-1], use_cache=True)
        cache, token = out.past_key_values, input_ids[:, -1:]
        model.set_attn_implementation("eager")  # decode steps return their attention weights
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True, output_attentions=True)
            token = out.logits[:, -1:].argmax(-1)
            generated = int(token)
            if generated not in needle:
                continue
            for layer, weights in enumerate(out.attentions):  # [1, Hq, 1, keys]
                top = weights[0, :, -1, : input_ids.shape[1]].argmax(-1)
                copies = inside[top] & (input_ids[0, top] == generated)
                hits[layer] += copies.float()
    return hits, len(positions)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from pyramidkv import models
    from pyramidkv.ruler import generate_sample

    torch.set_num_threads(args.threads)
    resolved = models.resolve_model(args.model_path)
    model, tokenizer = models.load_pretrained(resolved, torch.float32, "eager")
    started = time.time()
    total = None
    for index in range(args.n):
        sample = generate_sample(args.task, tokenizer, args.length, index, args.seed, chat_template=True,
                                 depth_order=args.depth_order)
        value = sample["outputs"][0]
        positions = value_token_positions(tokenizer, sample["input"], value)
        ids = tokenizer([sample["input"]], return_tensors="pt", add_special_tokens=False).input_ids
        hits, count = score_prompt(model, ids, positions, steps=len(positions) + 4)
        total = hits / count if total is None else total + hits / count
        print(f"prompt {index + 1}/{args.n}: {ids.shape[1]} tokens, best head {float((hits / count).max()):.2f}",
              file=sys.stderr)
    scores = (total / args.n).tolist()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"model": resolved.name, "per": "query_head", "task": args.task, "length": args.length,
                   "prompts": args.n, "seed": args.seed, "seconds": round(time.time() - started, 1),
                   "command": "python scripts/headkv_scores.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "scores": [[round(v, 4) for v in row] for row in scores]}, f, indent=1)
    print(f"wrote {args.out} ({time.time() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
