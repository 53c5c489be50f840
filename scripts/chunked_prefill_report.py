r"""Chunked prefill vs one-shot prefill: peak K/V memory and TTFT against the prompt length.

    python scripts/chunked_prefill_report.py                      # 4k..64k, SnapKV budget 512, chunk 1024
    python scripts/chunked_prefill_report.py --lengths 4096,8192 --max_unchunked_s 30

Model: random weights in the shape of ckpt/pyramidkv-tiny-llama (2 layers, hidden 256, 8 query / 2 KV
heads of 32, fp32, sdpa, CPU) with max_position_embeddings 131072 (the checkpoint's is 8192; TTFT and
memory do not depend on the weights). One subprocess per (length, mode), one run each (shared cores:
times are indicative). Measured per run:
- ttft_s: one forward over the prompt with logits_to_keep=1 (prefill + compression + first logits);
- peak_kv_bytes: the most K/V a layer held during prefill (CompressedLayer.peak_prefill_length: kept +
  chunk, or the whole prompt unchunked) x bytes per token, summed over layers — what the cache held;
- mask_bytes_estimate: the largest boolean 4-D attention mask one forward builds (q x kv bytes: S^2
  unchunked, chunk x (budget + chunk) chunked), the part of attention memory that grows with S^2;
- rss_peak_bytes: the subprocess's peak resident set (ru_maxrss) minus its RSS after loading the model.
The one-shot mode stops at the first length whose run took longer than --max_unchunked_s (the next,
twice as long, would take ~4x). Writes benchmarks/chunked_prefill/results.json and memory_ttft.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "chunked_prefill"


def measure(length: int, chunk: int | None, budget: int, window: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyramidkv

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, vocab_size=2148, max_position_embeddings=131072)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 2148, (1, length), generator=torch.Generator().manual_seed(1))
    base_rss = _rss_now()
    settings = dict(max_capacity_prompt=budget, window_size=window, prefill_chunk_size=chunk)
    with torch.no_grad(), pyramidkv.compress(model, "SnapKV", **settings):
        model(ids[:, : 2 * window + 64], past_key_values=pyramidkv.CompressedCache("SnapKV", model.config, **settings))
        cache = pyramidkv.CompressedCache("SnapKV", model.config, **settings)  # warmed up: now measured
        start = time.perf_counter()
        model(ids, past_key_values=cache, logits_to_keep=1)
        ttft = time.perf_counter() - start
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4  # K and V, fp32
    queries = length if chunk is None else chunk
    keys = length if chunk is None else min(length, budget + chunk)
    return {"length": length, "chunk": chunk, "ttft_s": round(ttft, 3),
            "peak_kv_bytes": sum(layer.peak_prefill_length for layer in cache.layers) * per_token,
            "kept_kv_tokens": cache.kept_tokens(),
            "mask_bytes_estimate": queries * keys,
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss}


def _rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for chunked, label in ((False, "one-shot prefill"), (True, "chunked prefill")):
        mine = [row for row in rows if (row["chunk"] is not None) == chunked]
        lengths = [row["length"] for row in mine]
        memory.plot(lengths, [row["peak_kv_bytes"] / 2**20 for row in mine], "o-", label=label)
        ttft.plot(lengths, [row["ttft_s"] for row in mine], "o-", label=label)
    for axis, title in ((memory, "peak K/V held during prefill (MiB)"), (ttft, "TTFT (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("prompt tokens")
        axis.set_title(title)
        axis.legend()
    fig.suptitle("SnapKV budget 512: chunked (1024) vs one-shot prefill, tiny Llama, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--max_unchunked_s", type=float, default=40.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "length,chunk" measured in this process
    args = parser.parse_args()
    if args.one:
        length, chunk = args.one.split(",")
        print(json.dumps(measure(int(length), None if chunk == "none" else int(chunk), args.budget, args.window)))
        return
    rows, one_shot = [], True
    for length in [int(n) for n in args.lengths.split(",")]:
        for chunk in ([None] if one_shot else []) + [args.chunk]:
            command = [sys.executable, __file__, "--one", f"{length},{chunk or 'none'}",
                       "--budget", str(args.budget), "--window", str(args.window)]
            row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(row, flush=True)
            rows.append(row)
            if chunk is None and row["ttft_s"] > args.max_unchunked_s:
                one_shot = False
    OUT.mkdir(parents=True, exist_ok=True)
    settings = {"method": "SnapKV", "budget": args.budget, "window": args.window, "chunk": args.chunk}
    (OUT / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    plot(rows, OUT / "memory_ttft.png")


if __name__ == "__main__":
    main()
