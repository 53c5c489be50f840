r"""KIVI quantization report: KV bytes, logit error and decode speed of quantized vs unquantized caches.

    python scripts/quant_report.py                                  # the embedded tiny checkpoint
    python scripts/quant_report.py --model_path smollm2 --context 2048 --out_dir benchmarks/quant

For FullKV and SnapKV at each --budgets value, unquantized and KIVI at each --nbits, and the per-head
methods (--perhead, unquantized: their storage does not take KIVI) at each budget: one prefill of a
--context-token prompt (README.md text, tokenized and repeated), then --new_tokens teacher-forced decode
steps on the unquantized dense run's greedy tokens, so every configuration at a budget sees the same
inputs. Reports cache.nbytes() after prefill and after decoding (what the cache really holds, its
preallocated decode room included), the logit difference vs the
dense unquantized run at the same budget (max over steps of max |dlogit| / max |logit|, and the share of
steps whose argmax agrees: an error for KIVI, a different selection for the per-head methods), and the
median decode time per token (TPOT) and its ratio to the dense run's. Writes
<out_dir>/quant_<model>_<context>.json and, with matplotlib, quant_<model>_<context>_memory_vs_budget.png
(dense, quantized and per-head bytes on one plot).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model_path", default="tiny", help="tiny (default), smollm2, or a checkpoint (pyramidkv.models)")
    p.add_argument("--out_dir", default="bench_out/quant", help="where the JSON and the plot go")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--budgets", default="128,256,512", help="SnapKV budgets, comma list (default 128,256,512)")
    p.add_argument("--nbits", default="8,4,2", help="comma list of 2, 4, 8 (default 8,4,2)")
    p.add_argument("--perhead", default="AdaKV,HeadKV",
                   help="per-head methods at each budget, comma list ('' for none; default AdaKV,HeadKV)")
    p.add_argument("--scores_file", default=None,
                   help="HeadKV scores for this model (default: HeadKV's own, SmolLM2's; the tiny checkpoint's: "
                        "benchmarks/perhead/tiny_headkv_scores.json)")
    p.add_argument("--group_size", type=int, default=32)
    p.add_argument("--residual_length", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=32, help="teacher-forced decode steps (default 32)")
    p.add_argument("--attn_implementation", default="sdpa", choices=("eager", "sdpa"))
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    try:
        args.budgets = [int(b) for b in args.budgets.split(",")]
        args.nbits = [int(b) for b in args.nbits.split(",")]
    except ValueError:
        p.error(f"--budgets {args.budgets!r} / --nbits {args.nbits!r}: give comma lists of integers")
    from pyramidkv.methods import METHODS
    from pyramidkv.methods.adakv import PerHeadSnapKV
    per_head = [name for name, cls in METHODS.items() if issubclass(cls, PerHeadSnapKV)]
    args.perhead = [m for m in args.perhead.split(",") if m]
    bad = [m for m in args.perhead if m not in per_head]
    if bad:
        p.error(f"--perhead {bad[0]!r}: valid choices are {', '.join(per_head)}")
    return args


def prompt_ids(tokenizer, length: int):
    import torch
    text = (REPO / "README.md").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    repeats = length // len(ids) + 1
    return torch.tensor([(ids * repeats)[:length]])


def run_variants(model, configs: list[tuple[str, dict]], input_ids, steps: int):
    """Per (method, config): (logits [steps, vocab], nbytes after prefill, nbytes after decoding, per-step
    seconds). One prefill per config, then the decode steps interleaved across the configs (step t of every config, then t + 1),
    so that a changing load on a shared CPU hits all of them alike; every config is fed the greedy
    tokens of the first (unquantized) one."""
    import torch
    import pyramidkv
    caches, logits, times = [], [[] for _ in configs], [[] for _ in configs]
    last, prefill_bytes = [], []
    with torch.inference_mode():
        for method, config in configs:
            with pyramidkv.compress(model, method, **config):
                out = model(input_ids, use_cache=True)
            caches.append(out.past_key_values)
            prefill_bytes.append(out.past_key_values.nbytes())
            last.append(out.logits[0, -1].float())
        for step in range(steps):
            token = torch.tensor([[int(last[0].argmax())]])
            for i, (method, config) in enumerate(configs):
                logits[i].append(last[i])
                with pyramidkv.compress(model, method, **config):  # the cache carries its own method
                    start = time.perf_counter()
                    out = model(token, past_key_values=caches[i], use_cache=True)
                    times[i].append(time.perf_counter() - start)
                last[i] = out.logits[0, -1].float()
    return [(torch.stack(logits[i]), prefill_bytes[i], caches[i].nbytes(), times[i]) for i in range(len(configs))]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from pyramidkv.models import load_pretrained, resolve_model
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    resolved = resolve_model(args.model_path)
    model, tokenizer = load_pretrained(resolved, torch.float32, args.attn_implementation, log=lambda *a: None)
    input_ids = prompt_ids(tokenizer, args.context)
    quant = {"quant_method": "kivi", "group_size": args.group_size, "residual_length": args.residual_length}
    rows, started = [], time.time()
    configs = [("FullKV", None)] + [("SnapKV", budget) for budget in args.budgets]
    head_scores = {"scores_file": args.scores_file} if args.scores_file else {}
    if "HeadKV" in args.perhead:  # a scores file of another model: say so now, not after the FullKV rows
        from pyramidkv.methods.headkv import DEFAULT_SCORES, load_head_scores
        config = model.config
        try:
            load_head_scores(args.scores_file or DEFAULT_SCORES, config.num_hidden_layers, config.num_attention_heads,
                             config.num_key_value_heads, config.num_key_value_heads)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for method, budget in configs:
        base = {} if budget is None else {"max_capacity_prompt": budget}
        variants = [(method, None, base)] + [(method, nbits, {**base, **quant, "nbits": nbits}) for nbits in args.nbits]
        if budget is not None:
            variants += [(name, None, {**base, **(head_scores if name == "HeadKV" else {})}) for name in args.perhead]
        try:
            results = run_variants(model, [(name, config) for name, _, config in variants], input_ids, args.new_tokens)
        except ValueError as err:  # e.g. a HeadKV scores file of another model
            print(f"error: {err}", file=sys.stderr)
            return 2
        reference, _, dense_bytes, dense_times = results[0]
        for (method, nbits, _), (logits, prefill_bytes, nbytes, times) in zip(variants, results):
            error = float(((logits - reference).abs().amax(-1) / reference.abs().amax(-1)).max())
            agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
            tpot = statistics.median(times[1:] or times)
            rows.append({"method": method, "budget": budget, "nbits": nbits or 32, "kv_bytes": nbytes,
                         "kv_bytes_after_prefill": prefill_bytes,
                         "bytes_vs_dense": nbytes / dense_bytes, "max_rel_logit_error": error,
                         "argmax_agreement": agree, "tpot_ms": 1e3 * tpot,
                         "tpot_vs_dense": tpot / statistics.median(dense_times[1:] or dense_times)})
            print(f"{method:7s} budget={budget or 'all':>5} nbits={nbits or 'fp32':>4}  bytes={nbytes:>10}  "
                  f"({rows[-1]['bytes_vs_dense']:.3f} of dense)  rel.err={error:.2e}  agree={agree:.2f}  "
                  f"tpot={1e3 * tpot:.2f} ms ({rows[-1]['tpot_vs_dense']:.2f}x)", flush=True)
    wall = time.time() - started
    command = "python scripts/quant_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.out_dir, exist_ok=True)
    name = resolved.name if hasattr(resolved, "name") else str(args.model_path)
    report = {"command": command.strip(), "wall_s": round(wall, 1), "model": name, "context": args.context,
              "new_tokens": args.new_tokens, "group_size": args.group_size, "residual_length": args.residual_length,
              "attn_implementation": args.attn_implementation, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    stem = os.path.join(args.out_dir, f"quant_{os.path.basename(os.path.normpath(args.model_path))}_{args.context}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {stem}.json ({wall:.0f} s)")
    plot(rows, args, stem + "_memory_vs_budget.png", name)
    return 0


def plot(rows, args, path: str, name: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for nbits in [32, *args.nbits]:
        snap = [r for r in rows if r["method"] == "SnapKV" and r["nbits"] == nbits]
        label = "dense fp32" if nbits == 32 else f"kivi {nbits}-bit"
        line = ax.plot([r["budget"] for r in snap], [r["kv_bytes_after_prefill"] / 2 ** 20 for r in snap], "o-",
                       label=f"SnapKV {label}")
        full = [r for r in rows if r["method"] == "FullKV" and r["nbits"] == nbits]
        ax.axhline(full[0]["kv_bytes_after_prefill"] / 2 ** 20, ls=":", color=line[0].get_color(), label=f"FullKV {label}")
    for method, marker in zip(args.perhead, "x+*"):  # per-head storage: SnapKV's total, so on the fp32 line
        heads = [r for r in rows if r["method"] == method]
        ax.plot([r["budget"] for r in heads], [r["kv_bytes_after_prefill"] / 2 ** 20 for r in heads], marker, ms=9, ls="none",
                label=f"{method} per-head fp32")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("SnapKV budget (tokens per layer and KV head)")
    ax.set_ylabel("KV cache bytes held after prefill (MiB)")
    ax.set_title(f"{name}: {args.context}-token prompt")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
