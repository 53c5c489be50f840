"""CommonKV report: KV bytes (nbytes) vs FullKV, logit / NLL difference and TTFT / TPOT of rebuilding K/V
from the latent, for groups of layer_step layers and ranks given as a fraction of FullKV's bytes.

    python scripts/commonkv_report.py --model smollm2 --tokens 1024 --layer_steps 2,3,5 \
        --fractions 0.5,0.25 --out benchmarks/commonkv/smollm2.json

The prompt is the first --tokens tokens of data/ppl/hamlet.txt; NLL is teacher-forced over the prompt in
one prefill forward (CommonKV's hooks give the prefill the low-rank K/V too); TPOT is the mean of
--decode_steps greedy steps. A rank of fraction f stores f x (2 x kv_heads x head_dim) numbers per token
and layer instead of K and V (--ranks gives the ranks directly). --factorization whitened calibrates the
factors on --calibration_tokens tokens of --calibration_file (default data/ppl/lear.txt; never the
prompt's hamlet.txt). --variants adds, per (layer_step, rank), the combinations the bytes table needs:
`merge` (cross-layer merge), `snapkvN` (SnapKV eviction to N tokens per layer), `kiviN` (latents stored
KIVI N-bit), joined with `+` (`snapkv512+kivi4`); `none` is CommonKV alone. Merge and eviction act after
each layer's prefill attention, so they change bytes and TPOT but not the teacher-forced NLL.
--controls runs the same forms without CommonKV (SnapKV / KIVI on the plain cache), for equal-bytes
comparisons. factor_s: the time to get CommonKV's factors (the SVDs, for whitened also the calibration
forward; a disk-cache load when they were computed before), taken before the timed prefill.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


VARIANT_FORMS = "none, merge, snapkvN, kiviN, joined with '+' (e.g. snapkv512+kivi4)"


def parse_variant(name: str) -> dict:
    """'snapkv512+kivi4' -> the CommonKV settings it names; a bad part is a one-line ValueError."""
    config = {}
    for part in name.split("+"):
        match = re.fullmatch(r"(none|merge|snapkv|kivi)(\d*)", part)
        if not match or (match.group(1) in ("none", "merge")) == bool(match.group(2)):
            raise ValueError(f"variant part {part!r} is unknown; valid forms: {VARIANT_FORMS}")
        kind, number = match.group(1), match.group(2)
        if kind == "merge":
            config["merge"] = True
        elif kind == "snapkv":
            config.update(evict_method="SnapKV", max_capacity_prompt=int(number))
        elif kind == "kivi":
            config.update(quant_method="kivi", nbits=int(number))
    return config


def control_config(name: str) -> tuple[str, dict]:
    """A variant run without CommonKV: 'snapkv128+kivi4' -> ("SnapKV", {max_capacity_prompt, quant_method, nbits})."""
    config = parse_variant(name)
    if config.pop("merge", False):
        raise ValueError(f"control {name!r}: merge exists only in CommonKV; valid forms: none, snapkvN, kiviN")
    return config.pop("evict_method", "FullKV"), config


def run(model, ids, method, config, decode_steps):
    import torch

    import pyramidkv
    from pyramidkv.cache import CompressedCache

    with pyramidkv.compress(model, method, **config), torch.no_grad():
        cache = CompressedCache(method, model.config, **config)
        start = time.perf_counter()  # CommonKV's factors (SVD, calibration forward) outside the timed prefill
        cache.method.prepare_model(model.model)
        factor_s = time.perf_counter() - start
        start = time.perf_counter()
        out = model(ids, past_key_values=cache)
        ttft = time.perf_counter() - start
        nbytes = cache.nbytes()
        logits = out.logits[0].float()
        token = logits[-1].argmax().view(1, 1)
        steps = []
        for _ in range(decode_steps):
            start = time.perf_counter()
            step = model(token, past_key_values=cache)
            steps.append(time.perf_counter() - start)
            token = step.logits[0, -1].argmax().view(1, 1)
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
    return {"ttft_s": ttft, "tpot_s": sum(steps) / max(1, len(steps)), "factor_s": factor_s, "nbytes": nbytes,
            "nll": nll}, logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--layer_steps", default="2,3,5")
    parser.add_argument("--fractions", default="0.5,0.25", help="rank as a fraction of FullKV's bytes per token")
    parser.add_argument("--ranks", default=None, help="latent ranks (comma list); given, they replace --fractions")
    parser.add_argument("--factorization", default="weights", help="CommonKV factorization: weights or whitened")
    parser.add_argument("--calibration_file", default=None, help="whitened: calibration text (default: lear.txt)")
    parser.add_argument("--calibration_tokens", type=int, default=512)
    parser.add_argument("--variants", default="none", help=f"comma list of CommonKV combinations: {VARIANT_FORMS}")
    parser.add_argument("--controls", default="", help="the same forms without CommonKV (e.g. snapkv128+kivi4: "
                        "SnapKV with KIVI on the plain cache), rows next to the CommonKV ones; merge is CommonKV-only")
    parser.add_argument("--decode_steps", type=int, default=16)
    parser.add_argument("--text", default=os.path.join(ROOT, "data", "ppl", "hamlet.txt"))
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help stays instant

    from pyramidkv import build_method
    from pyramidkv.models import load_pretrained, resolve_model

    factorization = {"factorization": args.factorization}
    if args.factorization != "weights":
        factorization.update(calibration_file=args.calibration_file, calibration_tokens=args.calibration_tokens)
    try:  # the method's own checks (factorization, calibration file and tokens), before the model loads
        variants = {name: parse_variant(name) for name in args.variants.split(",")}
        controls = {name: control_config(name) for name in args.controls.split(",") if name}
        for method, config in controls.values():
            build_method(method, **config)
        for step in [int(s) for s in args.layer_steps.split(",")]:
            for variant in variants.values():
                build_method("commonkv", layer_step=step, **factorization, **variant)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(resolve_model(args.model), torch.float32, "sdpa", log=lambda *a: None)
    with open(args.text) as handle:
        ids = tokenizer(handle.read(), return_tensors="pt").input_ids[:, : args.tokens]
    cfg = model.config
    kv_dim = cfg.num_key_value_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    full, full_logits = run(model, ids, "fullkv", {}, args.decode_steps)
    rows = [{"method": "FullKV", **full, "bytes_ratio": 1.0}]
    print(f"FullKV: {full}", flush=True)
    if args.ranks:
        ranks = [int(r) for r in args.ranks.split(",")]
    else:
        ranks = [round(float(f) * 2 * kv_dim) for f in args.fractions.split(",")]
    for step in [int(s) for s in args.layer_steps.split(",")]:
        for rank, (name, variant) in itertools.product(ranks, variants.items()):
            start = time.perf_counter()
            config = {"layer_step": step, "rank": rank, **factorization, **variant}
            result, logits = run(model, ids, "commonkv", config, args.decode_steps)
            rel = ((logits - full_logits).abs().max() / full_logits.abs().max()).item()
            row = {"method": "CommonKV", "variant": name, "layer_step": step, "rank": rank, "merge": False,
                   **factorization, **variant, **result,
                   "bytes_ratio": result["nbytes"] / full["nbytes"], "max_rel_logit_diff": rel,
                   "nll_diff": result["nll"] - full["nll"], "wall_s": time.perf_counter() - start}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name, (method, config) in controls.items():
        result, logits = run(model, ids, method, config, args.decode_steps)
        row = {"method": method, "variant": name, "control": True, **config, **result,
               "bytes_ratio": result["nbytes"] / full["nbytes"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    payload = {"model": args.model, "tokens": int(ids.shape[1]), "kv_dim": kv_dim, "layers": cfg.num_hidden_layers,
               "decode_steps": args.decode_steps, "torch_threads": torch.get_num_threads(), **factorization,
               "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(payload, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
