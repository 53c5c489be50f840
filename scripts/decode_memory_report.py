"""Constant-memory generation: TPOT and KV bytes vs generated tokens, full cache vs decode-time compression.

    python scripts/decode_memory_report.py                                  # tiny random Llama, 4000 new tokens
    python scripts/decode_memory_report.py --model_path smollm2 --new_tokens 2000 --cache_size 256

For each method one prompt is prefilled and `--new_tokens` tokens are generated greedily in a manual
loop (one forward per token); every `--every` tokens the script records the mean time per token of the
last window and `cache.nbytes()`. The full cache (FullKV: pyramidkv's preallocated buffer) grows by one
slot per token; a method with `max_cache_size` keeps its bytes flat and, once the cache is full, a
decode step costs what `cache_size` tokens cost. Writes <out_dir>/decode_memory[_interval<k>].json and a two-panel
PNG (TPOT, KV bytes vs tokens generated). The methods run one after another, so the TPOT columns of
one run are comparable with each other; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

METHODS = {"FullKV": {}, "StreamingLLM": {"sink_size": 4}, "H2O": {}, "TOVA": {}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", default=None, help="smollm2, tiny, a checkpoint or hub id; unset: a random "
                                                      "4-layer Llama (hidden 256, 8/2 heads) built in code")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=4000)
    p.add_argument("--cache_size", type=int, default=512, help="max_cache_size of the compressing methods")
    p.add_argument("--compress_interval", type=int, default=1,
                   help="the compressing methods evict every this many tokens (the cache then holds up to "
                        "cache_size + interval - 1): amortizes the per-eviction cost")
    p.add_argument("--every", type=int, default=100, help="record every this many tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out_dir", default=None, help="default: bench_out/decode_memory_<UTC time>")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid choices: {', '.join(METHODS)}")
    for name in ("prompt_tokens", "new_tokens", "cache_size", "compress_interval", "every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} is invalid: it must be a positive integer")

    import torch

    import pyramidkv

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model_path is None:
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1 << 16)
        model, model_name = LlamaForCausalLM(config).eval(), "random tiny Llama (4 layers, hidden 256)"
    else:
        from pyramidkv import models
        resolved = models.resolve_model(args.model_path)
        model, _ = models.load_pretrained(resolved, torch.float32, "sdpa")
        model_name = resolved.name
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    results = {"model": model_name, "prompt_tokens": args.prompt_tokens, "cache_size": args.cache_size,
               "compress_interval": args.compress_interval,
               "threads": args.threads, "methods": {}}
    for method in methods:
        config = dict(METHODS[method])
        if method != "FullKV":
            config.update(max_cache_size=args.cache_size, max_capacity_prompt=args.cache_size,
                          window_size=min(args.cache_size // 2, 64), compress_interval=args.compress_interval)
        points = []
        with pyramidkv.compress(model, method, **config), torch.no_grad():
            out = model(prompt)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for step in range(1, args.new_tokens + 1):
                token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
                if step % args.every == 0:
                    now = time.perf_counter()
                    points.append({"generated": step, "tpot_ms": 1000 * (now - start) / args.every,
                                   "kv_bytes": cache.nbytes(), "physical_tokens": max(cache.physical_lengths())})
                    start = time.perf_counter()
        results["methods"][method] = {"config": config, "points": points}
        last = points[-1]
        print(f"{method:13s} after {last['generated']} tokens: TPOT {last['tpot_ms']:.2f} ms, "
              f"KV {last['kv_bytes'] / 2**20:.2f} MiB, {last['physical_tokens']} tokens held", flush=True)

    out_dir = args.out_dir or os.path.join("bench_out", "decode_memory_" + time.strftime("%Y%m%d_%H%M%S", time.gmtime()))
    os.makedirs(out_dir, exist_ok=True)
    stem = "decode_memory" if args.compress_interval == 1 else f"decode_memory_interval{args.compress_interval}"
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return 0
    figure, (tpot_axis, bytes_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for method, run in results["methods"].items():
        x = [pt["generated"] for pt in run["points"]]
        tpot_axis.plot(x, [pt["tpot_ms"] for pt in run["points"]], label=method)
        bytes_axis.plot(x, [pt["kv_bytes"] / 2**20 for pt in run["points"]], label=method)
    tpot_axis.set(xlabel="tokens generated", ylabel="ms per token (mean of the last window)", title="TPOT")
    bytes_axis.set(xlabel="tokens generated", ylabel="MiB", title="KV cache bytes (cache.nbytes())")
    for axis in (tpot_axis, bytes_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{model_name}, prompt {args.prompt_tokens}, max_cache_size {args.cache_size}, "
                    f"compress_interval {args.compress_interval}")
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, stem + ".png"), dpi=110)
    print(f"wrote {out_dir}/{stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
