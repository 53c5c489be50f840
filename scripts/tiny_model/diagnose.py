#!/usr/bin/env python
"""Look inside a tiny checkpoint's RULER answers (the numbers behind MODEL_CARD.md's diagnosis).

  errors          greedy answers of the first question, wrong ones classified: copy error (the right
                  needle's value with some digits replaced) or wrong needle (another needle's value,
                  and whether its key shares the asked key's first/last word)
  copy_attention  teacher-forced: for each answer value token (a digit or digit group), the attention
                  mass a layer-1 head puts on the right token vs on the same-position tokens of the
                  other needles, split by whether the model predicted that token correctly
  key_norms       mean rank (1 = lowest) of the needle value tokens' key L2 norms, per layer and KV head —
                  what a lowest-norm eviction rule (KnormPress / L2Norm) keys on

Examples:
  python scripts/tiny_model/diagnose.py errors --task niah_multikey_2 --n 48
  python scripts/tiny_model/diagnose.py copy_attention --seed 7 --n 30 --heads 0 4
  python scripts/tiny_model/diagnose.py key_norms --task niah_single_1 --n 5
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from scripts.tiny_model.packing import NEEDLE_RE, _tokens_in, pack_sample  # noqa: E402


def _needles(text: str, offsets) -> list[tuple[str, str, list[int]]]:
    """(key, value, value token positions) of every needle-shaped sentence."""
    return [(m.group(2), m.group(3), _tokens_in(offsets, *m.span(3))) for m in NEEDLE_RE.finditer(text)]


def errors(model, tok, samples) -> dict:
    counts: dict = {}
    for start in range(0, len(samples), 8):
        batch = samples[start:start + 8]
        enc = tok([s["input"] for s in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for s, ids in zip(batch, out[:, enc.input_ids.shape[1]:]):
            pred = tok.decode(ids, skip_special_tokens=True).strip().split(",")[0].strip().rstrip(".")
            truth = s["outputs"][0]
            needles = [(k, v) for k, v, _ in _needles(s["input"], tok(s["input"], return_offsets_mapping=True)
                                                        .offset_mapping)]
            asked = next(k for k, v in needles if v == truth)
            if pred == truth:
                kind = "correct"
            elif any(v == pred for _, v in needles):
                other = next(k for k, v in needles if v == pred)
                shared = [w for w, a, b in (("first word", other.split("-")[0], asked.split("-")[0]),
                                            ("last word", other.split("-")[-1], asked.split("-")[-1])) if a == b]
                kind = "wrong needle" + (f" (shares {' and '.join(shared)})" if shared else "")
            elif len(pred) == len(truth):
                kind = f"copy error ({sum(a != b for a, b in zip(pred, truth))} digits replaced)"
            else:
                kind = "other"
            counts[kind] = counts.get(kind, 0) + 1
            if kind != "correct":
                print(f"{kind:34s} key={asked} truth={truth} answer={pred}")
    return counts


def copy_attention(model, tok, samples, heads: list[int]) -> dict:
    """{(head, "right"|"wrong"): (tokens, mean mass on the right token, mean mass on other needles' tokens)}"""
    sums: dict = {}
    for s in samples:
        packed = pack_sample(s, tok, random.Random(0), max_questions=1)
        needles = _needles(s["input"], tok(s["input"], return_offsets_mapping=True).offset_mapping)
        right = next(pos for _, v, pos in needles if v == s["outputs"][0])
        with torch.no_grad():
            out = model(torch.tensor([packed["ids"]]), output_attentions=True)
        value_tokens = packed["first"][1:]  # the first answer token is the space before the number
        for m, (pos, target) in enumerate(value_tokens):
            ok = out.logits[0, pos].argmax().item() == target
            for h in heads:
                att = out.attentions[1][0, h, pos]
                others = sum(att[p[m]].item() for _, v, p in needles if p is not right and len(p) > m)
                r = sums.setdefault((h, "right" if ok else "wrong"), [0, 0.0, 0.0])
                r[0] += 1
                r[1] += att[right[m]].item()
                r[2] += others
    return {key: (n, a / n, o / n) for key, (n, a, o) in sorted(sums.items())}


def key_norms(model, tok, samples) -> dict:
    """{(layer, KV head): (mean key-norm rank of the needle value tokens, 1 = lowest; mean prompt tokens)}"""
    ranks: dict = {}
    n_tokens = []
    for s in samples:
        enc = tok(s["input"], return_offsets_mapping=True)
        pos = next(p for _, v, p in _needles(s["input"], enc.offset_mapping) if v == s["outputs"][0])
        n_tokens.append(len(enc.input_ids))
        with torch.no_grad():
            cache = model(torch.tensor([enc.input_ids]), use_cache=True).past_key_values
        for layer in range(model.config.num_hidden_layers):
            keys = cache.layers[layer].keys[0]  # [kv heads, L, d]
            for h in range(keys.shape[0]):
                rank = keys[h].norm(dim=-1).argsort().argsort() + 1  # 1 = lowest norm
                ranks.setdefault((layer, h), []).extend(rank[pos].tolist())
    return {key: (sum(r) / len(r), sum(n_tokens) / len(n_tokens)) for key, r in ranks.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["errors", "copy_attention", "key_norms"])
    ap.add_argument("--model_path", default="ckpt/pyramidkv-tiny-llama")
    ap.add_argument("--task", default="niah_multikey_2")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--n", type=int, default=30, help="prompts: indices 0..n-1 of --seed")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--heads", type=int, nargs="+", default=[0], help="layer-1 heads (copy_attention)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from pyramidkv.ruler import generate_sample
    tok = AutoTokenizer.from_pretrained(args.model_path)
    attn = "eager" if args.what == "copy_attention" else "sdpa"  # attention weights need eager
    model = AutoModelForCausalLM.from_pretrained(args.model_path, attn_implementation=attn).eval()
    # the grid order of the README's diagnosis numbers (pyramidkv.ruler.niah.DEPTH_ORDERS)
    samples = [generate_sample(args.task, tok, args.length, i, args.seed, depth_order="sequential")
               for i in range(args.n)]
    if args.what == "errors":
        for kind, count in errors(model, tok, samples).items():
            print(f"{kind}: {count}")
    elif args.what == "copy_attention":
        for (h, outcome), (n, right, others) in copy_attention(model, tok, samples, args.heads).items():
            print(f"head {h}, value token predicted {outcome}: {n} tokens; mass on the right token {right:.2f}, "
                  f"on the other needles' same-position tokens {others:.2f}")
    else:
        for (layer, h), (rank, n_tokens) in key_norms(model, tok, samples).items():
            print(f"layer {layer}, KV head {h}: needle value tokens' key-norm rank {rank:.0f} (1 = lowest) "
                  f"of ~{n_tokens:.0f} tokens")


if __name__ == "__main__":
    main()
