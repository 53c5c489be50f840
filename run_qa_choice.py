"""Multiple-choice QA accuracy by log-likelihood, full cache vs compressed (CaM's QA protocol).

    python run_qa_choice.py --input_path openbookqa-0.jsonl --compress_ratio 0.4 --kv_method H2O \\
        --output_dir out_qa/

--input_path: lm-eval-harness-style jsonl (context, choices, gold); without it the bundled smoke sample
data/qa_choice_smoke/choices.jsonl (self-written, NOT a real benchmark). Writes --output_dir/
{samples.jsonl, results.csv, summary.json, config.json}; a rerun skips finished ids and refuses other
settings. See pyramidkv/qa_choice.py for the scoring.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import sys

from run_summarization import add_compression_args, add_model_args, add_run_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Multiple-choice QA by log-likelihood before and after "
                                            "KV-cache compression (accuracy, memory, time).")
    add_model_args(p)
    p.add_argument("--input_path", default=None,
                   help="jsonl with context, choices, gold per line (default: the bundled smoke sample)")
    p.add_argument("--split", default="test",
                   help='slice of the file in the datasets syntax, e.g. "test[:100]" (default: all)')
    p.add_argument("--compress_ratio", type=float, default=0.4,
                   help="fraction of the context's K/V removed, in [0, 1) (default: 0.4)")
    p.add_argument("--kv_method", default="SnapKV", help="any pyramidkv method (default: SnapKV)")
    p.add_argument("--output_dir", default=None,
                   help="results directory (default: results_qa_choice/<file>_<method>_<ratio>)")
    add_compression_args(p)
    add_run_args(p)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from pyramidkv.sharding import refuse_sharding
    refuse_sharding("run_qa_choice.py")
    import pyramidkv
    from pyramidkv import predict, qa_choice, summarization, summary_report
    from pyramidkv.result_files import append_jsonl
    from run_summarization import check_numbers, method_config, resolve_model, versions

    check_numbers(args)
    args.model_path = args.model_path or getattr(predict, "DEFAULT_MODEL", "smollm2")
    predict.check_method(args.kv_method)
    try:
        method = pyramidkv.build_method(args.kv_method, **method_config(args, args.window_size + 1)).name
    except ValueError as err:
        raise predict.CLIError(str(err)) from None
    path = args.input_path or qa_choice.SMOKE_FILE
    if not os.path.isfile(path):
        raise predict.CLIError(f"--input_path {path!r}: no such file")
    questions = qa_choice.load_questions(path)
    parts = summarization.parse_split(args.split)
    questions = [questions[i] for i in summarization.select_rows(parts, len(questions), args.split, path)]
    smoke = args.input_path is None
    print(f"data: {len(questions)} questions from {path}" + (
        " (bundled smoke sample: self-written, NOT a real benchmark; accuracy on it only shows the pipeline "
        "works)" if smoke else ""), file=sys.stderr, flush=True)
    model_name, fingerprint = resolve_model(args, predict)
    stem = os.path.splitext(os.path.basename(path))[0]
    output_dir = os.path.normpath(args.output_dir) if args.output_dir else os.path.join("results_qa_choice",
                                                 f"{stem}_{method}_{args.compress_ratio:g}")
    device = predict.resolve_device(args.device)
    settings = {"model_name": model_name, "model_fingerprint": fingerprint, "input": os.path.abspath(path),
                "kv_method": method, "compress_ratio": args.compress_ratio,
                "method_config": {k: v for k, v in method_config(args, 0).items() if k != "max_capacity_prompt"},
                "attn_implementation": args.attn_implementation, "dtype": args.dtype, "device": device,
                "seed": args.seed}
    info = {"model": args.model_path, "split": args.split, "smoke_sample": smoke, "command": " ".join(sys.argv),
            "budget_rule": "per question: max_capacity_prompt = max(window_size + 1, ceil((1 - compress_ratio)"
                           " * context_tokens))", "full_cache": "transformers' DynamicCache",
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions()}
    summary_report.check_settings(output_dir, settings, info)
    records = summary_report.load_records(output_dir)
    pending = [q for q in questions if q["id"] not in records]
    if pending:
        logging.getLogger("pyramidkv").setLevel(logging.WARNING)
        predict.set_seed(args.seed)
        model, tokenizer = predict.load_model_and_tokenizer(args)
        from tqdm import tqdm
        for question in tqdm(pending, desc=f"{stem} {method} r={args.compress_ratio:g}", unit="question"):
            record = run_question(args, model, tokenizer, question, method)
            append_jsonl(os.path.join(output_dir, summary_report.SAMPLES_FILE), record)
            records[record["id"]] = record
    summary = qa_choice.write_outputs(output_dir, [records[q["id"]] for q in questions], {**settings, **info})
    before, after = summary["metrics_before"], summary["metrics_after"]
    print(f"{len(questions)} questions -> {output_dir}/{{results.csv,summary.json}}\n"
          f"acc {before['acc']:.1f} -> {after['acc']:.1f}, acc_norm {before['acc_norm']:.1f} -> "
          f"{after['acc_norm']:.1f}, agreement {summary['agreement']:.1f}%; K/V MB "
          f"{summary['memory_before_MB']:.3f} -> {summary['memory_after_MB']:.3f}", file=sys.stderr)


def run_question(args, model, tokenizer, question, method) -> dict:
    from pyramidkv import qa_choice, summary_prompt
    from run_summarization import method_config

    context_ids = tokenizer(question["context"])["input_ids"]
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in question["choices"]]
    budget = summary_prompt.kv_budget(len(context_ids), args.compress_ratio, args.window_size)
    full = qa_choice.score_choices(model, context_ids, choice_ids)
    compressed = qa_choice.score_choices(model, context_ids, choice_ids, method, method_config(args, budget))
    record = {"id": question["id"], "kv_method": method, "gold": question["gold"],
              "prompt_tokens": len(context_ids), "kv_budget": budget, "kept_tokens_after": compressed["kept_tokens"]}
    for side, result in (("before", full), ("after", compressed)):
        pred, pred_norm = qa_choice.predictions(result["scores"], question["choices"])
        record.update({f"scores_{side}": result["scores"], f"pred_{side}": pred, f"pred_norm_{side}": pred_norm,
                       f"kv_bytes_{side}": result["kv_bytes"], f"time_{side}_s": result["time_s"]})
    return record


if __name__ == "__main__":
    build_parser().parse_args()  # --help and bad flags end here, before the heavy imports
    from pyramidkv.predict import run_cli
    sys.exit(run_cli(main))
