"""Per-head budgets: KV bytes (SnapKV vs AdaKV vs HeadKV at one budget) and decode TPOT (per-head vs
dense storage) — the numbers in benchmarks/perhead/.

    python scripts/perhead_report.py bytes --model_path smollm2 --length 2048 --budget 256 \
        --out benchmarks/perhead/bytes_smollm2.json
    python scripts/perhead_report.py tpot --lengths 2048,8192,16384 --budget 256 \
        --out benchmarks/perhead/tpot_tiny.json

`bytes`: one RULER needle prompt (niah_single_2, chat template); per method the cache's nbytes()
after prefill, the tokens kept by each KV head, what a dense layout padded to each layer's longest
head would hold, and whether the greedy answer contains the needle. `tpot`: a random-weight Llama of
the benchmark's tiny shape (4 layers, hidden 256, 8 heads, 2 KV heads, fp32), random prompts; per
length and method the prefill time and the median decode step (sdpa, --threads threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

METHODS = ("SnapKV", "AdaKV", "HeadKV")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bytes", help="KV bytes at one budget on one RULER prompt")
    b.add_argument("--model_path", default="smollm2", help="model (default: smollm2)")
    b.add_argument("--length", type=int, default=2048, help="prompt tokens (default: 2048)")
    b.add_argument("--budget", type=int, default=256, help="max_capacity_prompt (default: 256)")
    b.add_argument("--scores_file", default=None, help="HeadKV scores (default: HeadKV's own default file)")
    b.add_argument("--index", type=int, default=0, help="RULER sample index (default: 0)")
    t = sub.add_parser("tpot", help="decode time per token, per-head vs dense, on the tiny shape")
    t.add_argument("--lengths", default="2048,8192,16384", help="prompt lengths (default: 2048,8192,16384)")
    t.add_argument("--budget", type=int, default=256, help="max_capacity_prompt (default: 256)")
    t.add_argument("--new_tokens", type=int, default=32, help="decode steps timed (default: 32)")
    for sp in (b, t):
        sp.add_argument("--out", required=True, help="JSON file to write")
        sp.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    return p


def layer_report(cache):
    per_head = cache.kept_tokens_per_head()
    layers = []
    for layer, kept in zip(cache.layers, per_head):
        heads = kept[0]
        dim, size = layer.keys.shape[-1], layer.keys.element_size()
        layers.append({"kept_per_head": heads, "padded_bytes": max(heads) * len(heads) * dim * 2 * size,
                       "kv_bytes": sum(heads) * dim * 2 * size})
    return layers


def run_bytes(args):
    import torch

    import pyramidkv
    from pyramidkv import models
    from pyramidkv.ruler import generate_sample

    resolved = models.resolve_model(args.model_path)
    model, tokenizer = models.load_pretrained(resolved, torch.float32, "sdpa")
    sample = generate_sample("niah_single_2", tokenizer, args.length, args.index, 42, chat_template=True)
    enc = tokenizer([sample["input"]], return_tensors="pt", add_special_tokens=False)
    rows = {}
    for method in ("FullKV", *METHODS):
        config = {} if method == "FullKV" else {"max_capacity_prompt": args.budget}
        if method == "HeadKV" and args.scores_file:
            config["scores_file"] = args.scores_file
        started = time.perf_counter()
        with pyramidkv.compress(model, method, **config), torch.no_grad():
            out = model.generate(**enc, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id)
            prefill_bytes = out.past_key_values.nbytes()
            answer = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(answer[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        row = {"nbytes": prefill_bytes, "answer": text, "correct": sample["outputs"][0] in text,
               "seconds": round(time.perf_counter() - started, 1)}
        if method != "FullKV":
            layers = layer_report(out.past_key_values)
            row.update(kv_bytes=sum(l["kv_bytes"] for l in layers), padded_bytes=sum(l["padded_bytes"] for l in layers),
                       kept_per_head=[l["kept_per_head"] for l in layers])
            row["index_bytes"] = prefill_bytes - row["kv_bytes"]
        rows[method] = row
        print(f"{method}: {prefill_bytes} bytes, correct={row['correct']}", file=sys.stderr)
    return {"model": resolved.name, "prompt_tokens": enc.input_ids.shape[1], "budget": args.budget,
            "task": "niah_single_2", "index": args.index, "needle": sample["outputs"][0], "methods": rows}


def run_tpot(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyramidkv

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=65536)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    rows = []
    for length in [int(n) for n in args.lengths.split(",")]:
        ids = torch.randint(3, 1024, (1, length), generator=torch.Generator().manual_seed(length))
        for method in METHODS:
            extra = {}
            if method == "HeadKV":  # fixed scores (KV head 1 twice head 0) for the random model: storage cost is timed
                path = os.path.join(tempfile.mkdtemp(), "scores.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump({"model": "random tiny shape", "scores": [[1.0, 2.0]] * 4}, f)
                extra["scores_file"] = path
            with pyramidkv.compress(model, method, max_capacity_prompt=args.budget, **extra), torch.no_grad():
                started = time.perf_counter()
                out = model(ids, use_cache=True)
                prefill = time.perf_counter() - started
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                steps = []
                for _ in range(args.new_tokens):
                    started = time.perf_counter()
                    out = model(token, past_key_values=cache, use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
                    steps.append(time.perf_counter() - started)
            rows.append({"length": length, "method": method, "storage": type(cache.layers[0]).__name__,
                         "prefill_s": round(prefill, 3), "tpot_ms": round(1000 * statistics.median(steps), 3),
                         "nbytes": cache.nbytes()})
            print(rows[-1], file=sys.stderr)
    return {"model": "random Llama, 4 layers, hidden 256, 8 heads, 2 KV heads, fp32, sdpa", "budget": args.budget,
            "new_tokens": args.new_tokens, "rows": rows}


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    result = run_bytes(args) if args.command == "bytes" else run_tpot(args)
    result["wall_s"] = round(time.time() - started, 1)
    result["command"] = "python scripts/perhead_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['wall_s']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
