"""Why CaM and PyramidInfer degenerate at high compress ratios (summarization smoke, SmolLM2).

Runs one prefill of a bundled smoke article per compress ratio and reports, per method:
- PyramidInfer: its per-layer budgets (the released rule removes r + 0.01 * layer of the tokens);
- CaM: how much the merged values grow — mean over kept slots of ||v_merged|| / ||v_kept|| per layer,
  and the share of evicted tokens merged — since CaM ADDS v_i / m to each of the m slots after an
  evicted token (values are not averaged).

    python scripts/diagnose_merging.py --model_path smollm2 --ratios 0.2,0.4,0.6,0.8 --out benchmarks/summarization_smoke/merging_diagnosis.json
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="smollm2")
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8")
    p.add_argument("--out", default=None, help="JSON file for the numbers (default: print only)")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]

    import torch
    import pyramidkv
    from pyramidkv import models
    from pyramidkv.methods import cam as cam_module

    torch.set_num_threads(1)
    model, tokenizer = models.load_pretrained(models.resolve_model(args.model_path), torch.float32, "sdpa")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "summarization_smoke")
    with open(os.path.join(root, "news.jsonl"), encoding="utf-8") as f:
        article = json.loads(f.readline())["document"]
    ids = tokenizer(article, return_tensors="pt").input_ids
    report = {"model": args.model_path, "prompt_tokens": ids.shape[1], "pyramidinfer_budgets": {}, "cam": {}}

    growth = []
    original = cam_module.CaM._merge_following

    def recording(self, split, scores, values, draws):
        merged = original(self, split, scores, values, draws)
        kept = values.gather(2, split.keep[..., None].expand(*split.keep.shape, values.shape[-1])).float()
        ratio = (merged.float().norm(dim=-1) / kept.norm(dim=-1).clamp(min=1e-9)).mean().item()
        m = self.merge_window or self.window_size
        first = torch.searchsorted(torch.where(split.slot_is_real, split.keep, -1).contiguous(),
                                   split.evicted.contiguous(), right=True)
        growth.append((ratio, int(split.evicted_valid.sum()), int((first < split.keep.shape[-1]).sum()), m))
        return merged

    cam_module.CaM._merge_following = recording
    try:
        for r in ratios:
            method = pyramidkv.build_method("PyramidInfer", compress_ratio=r)
            report["pyramidinfer_budgets"][str(r)] = method.layer_budgets(ids.shape[1], model.config.num_hidden_layers)
            growth.clear()
            with pyramidkv.compress(model, "CaM", compress_ratio=r), torch.no_grad():
                model(ids)
            report["cam"][str(r)] = {"value_norm_growth_per_layer": [round(g[0], 3) for g in growth],
                                     "mean_value_norm_growth": round(sum(g[0] for g in growth) / len(growth), 3),
                                     "evicted_per_layer_and_head": growth[0][1] // max(1, model.config.num_key_value_heads)}
            print(f"ratio {r}: PyramidInfer budgets {report['pyramidinfer_budgets'][str(r)][::5]} (every 5th layer); "
                  f"CaM mean ||v_merged||/||v|| {report['cam'][str(r)]['mean_value_norm_growth']}", flush=True)
    finally:
        cam_module.CaM._merge_following = original
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
