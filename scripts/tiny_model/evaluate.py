"""Greedy RULER-niah evaluation of a (tiny) checkpoint: string_match_all x 100, as RULER scores it."""
from __future__ import annotations

import contextlib

import torch


def string_match_all(pred: str, refs: list[str]) -> float:
    return sum(r.lower() in pred.lower() for r in refs) / len(refs)


@torch.no_grad()
def evaluate(model, tok, sampler, task: str, length: int, n: int = 100, seed: int = 42,
             batch_size: int = 8, max_new_tokens: int = 48, method: str | None = None, **method_kw):
    """Mean string_match_all x100 over samples index 0..n-1 of `seed`; method = pyramidkv method or None."""
    model.eval()
    scores = []
    for start in range(0, n, batch_size):
        samples = [sampler(task, tok, length, i, seed) for i in range(start, min(n, start + batch_size))]
        enc = tok([s["input"] for s in samples], return_tensors="pt", padding=True).to(model.device)
        ctx = contextlib.nullcontext()
        if method is not None:
            import pyramidkv
            ctx = pyramidkv.compress(model, method, **method_kw)
        with ctx:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        scores += [string_match_all(t, s["outputs"]) for t, s in zip(texts, samples)]
    return round(100 * sum(scores) / len(scores), 2)
