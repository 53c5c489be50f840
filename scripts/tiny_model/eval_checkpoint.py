#!/usr/bin/env python
"""Measure a tiny checkpoint on RULER niah tasks (greedy, string_match_all x100), FullKV or compressed.

Samples come from the project's generator (pyramidkv.ruler) with seed 42, indices 0..n-1 — disjoint from
the training seeds (>= 10_000). Example:
  python scripts/tiny_model/eval_checkpoint.py --lengths 1024 2048 --n 100
  python scripts/tiny_model/eval_checkpoint.py --tasks niah_single_1 --lengths 1024 \\
      --methods FullKV SnapKV StreamingLLM --capacities 64 128 256
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from scripts.tiny_model.evaluate import evaluate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default="ckpt/pyramidkv-tiny-llama")
    ap.add_argument("--tasks", nargs="+", default=["niah_single_1", "niah_multikey_1", "niah_multikey_2"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--methods", nargs="+", default=["FullKV"])
    ap.add_argument("--capacities", nargs="+", type=int, default=[128])
    ap.add_argument("--window_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out_json", default=None, help="append one JSON line per result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from functools import partial
    from pyramidkv.ruler import generate_sample
    # the grid order of the model card's numbers (pyramidkv.ruler.niah.DEPTH_ORDERS)
    generate_sample = partial(generate_sample, depth_order="sequential")
    tok = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path).eval()
    for method in args.methods:
        caps = [None] if method.lower() == "fullkv" else args.capacities
        for cap in caps:
            kw = {} if cap is None else {"max_capacity_prompt": cap, "window_size": args.window_size}
            for length in args.lengths:
                for task in args.tasks:
                    t0 = time.time()
                    score = evaluate(model, tok, generate_sample, task, length, n=args.n, seed=args.seed,
                                     method=None if cap is None else method, **kw)
                    rec = {"method": method, "capacity": cap, "task": task, "length": length, "n": args.n,
                           "seed": args.seed, "score": score, "seconds": round(time.time() - t0, 1)}
                    print(json.dumps(rec), flush=True)
                    if args.out_json:
                        with open(args.out_json, "a") as f:
                            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
