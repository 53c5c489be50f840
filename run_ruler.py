"""Predict RULER answers with a KV-cache compression method.

    python run_ruler.py --method SnapKV --max_capacity_prompts 128 --context_lengths 4096,8192

Samples come from {data_dir}/{length}/{task}.jsonl when --data_dir holds them (written by
`python -m pyramidkv.ruler`), otherwise they are generated on the fly with the model's own tokenizer
(deterministic in --seed). Writes {save_dir}/{model_name}_{max_capacity_prompts}/{length}/{task}/
{method}.json (one JSON line per sample: pred, outputs, length, index, depth; appended and flushed; a
rerun skips finished indices) and run_meta.json. Score with:
    python eval.py --results_dir {save_dir}/{model_name}_{max_capacity_prompts}
"""
from __future__ import annotations

import argparse
import os
import sys

from pyramidkv import predict, result_files
from pyramidkv.ruler import DEFAULT_TASKS, TASKS, generate_sample, parse_task_list, tokens_to_generate
from pyramidkv.ruler.__main__ import parse_lengths
from pyramidkv.ruler.dataset import dataset_path, read_dataset, read_meta
from pyramidkv.ruler.haystacks import ESSAY_SOURCE
from pyramidkv.ruler.qa import find_qa_file
from pyramidkv.ruler.spec import task_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RULER predictions (Hsieh et al., 2024): synthetic long-context tasks generated "
                    "offline in the model's own tokens, greedy decoding, RULER's tokens_to_generate.")
    predict.add_common_args(parser)
    g = parser.add_argument_group("RULER")
    g.add_argument("--context_lengths", default="4096",
                   help="comma list of total lengths in tokens (prompt + tokens_to_generate) (default: 4096)")
    g.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma list of {', '.join(TASKS)}, or 'all' (default: the 11 offline tasks; "
                        "qa_1/qa_2 need data/squad.json / data/hotpotqa.json)")
    g.add_argument("--num_samples", type=int, default=100, help="samples per task and length (default: 100)")
    g.add_argument("--data_dir", default=None,
                   help="root of pre-generated {length}/{task}.jsonl files (python -m pyramidkv.ruler); "
                        "missing files are generated on the fly (default: generate everything)")
    g.add_argument("--qa_dir", default=None, help="folder with squad.json / hotpotqa.json (default: data/)")
    return parser


def data_source(args, task: str, length: int) -> str:
    path = dataset_path(args.data_dir, length, task) if args.data_dir else None
    return path if path and os.path.exists(path) else "generated on the fly"


def sample_getter(args, tokenizer, task: str, length: int, chat: bool):
    """index -> sample: from the pre-generated file when there is one, else generated now."""
    path = data_source(args, task, length)
    if path != "generated on the fly":
        samples = {s["index"]: s for s in read_dataset(path)}
        missing = [i for i in range(args.num_samples) if i not in samples]
        if missing:
            raise predict.CLIError(f"{path} has no sample index {missing[0]} (needs 0..{args.num_samples - 1}); "
                                   "regenerate it with python -m pyramidkv.ruler --num_samples N")
        meta = read_meta(path) or {}
        if meta and (meta.get("seed") != args.seed or meta.get("chat_template") != chat):
            print(f"warning: {path} was generated with seed={meta.get('seed')} chat_template="
                  f"{meta.get('chat_template')}, this run uses seed={args.seed} chat_template={chat}",
                  file=sys.stderr, flush=True)
        return samples.__getitem__
    return lambda i: generate_sample(task, tokenizer, length, i, args.seed, chat_template=chat,
                                     qa_dir=args.qa_dir)


def run_task(args, model, tokenizer, task, length, out_dir, config, chat, tqdm) -> None:
    out_path = os.path.join(out_dir, str(length), task, f"{args.method}.json")
    done = result_files.load_done_ids(out_path, key="index")
    pending = [i for i in range(args.num_samples) if i not in done]
    get_sample = sample_getter(args, tokenizer, task, length, chat)
    progress = tqdm(total=args.num_samples, initial=args.num_samples - len(pending),
                    desc=f"{task}@{length}", unit="sample")
    for start in range(0, len(pending), args.eval_batch_size):
        batch = [get_sample(i) for i in pending[start:start + args.eval_batch_size]]
        preds = predict.generate(model, tokenizer, [s["input"] for s in batch],
                                 max(s["tokens_to_generate"] for s in batch), args.method, config)
        for sample, pred in zip(batch, preds):
            result_files.append_jsonl(out_path, {"pred": pred, "outputs": sample["outputs"],
                                                 "length": sample["length"], "index": sample["index"],
                                                 "depth": sample.get("depth")})
        progress.update(len(batch))
    progress.close()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        tasks = parse_task_list(args.tasks)
        lengths = parse_lengths(args.context_lengths)
    except ValueError as err:
        raise predict.CLIError(str(err)) from None
    for name, value in (("--num_samples", args.num_samples), ("--eval_batch_size", args.eval_batch_size)):
        if value < 1:
            raise predict.CLIError(f"{name} {value} must be at least 1")
    predict.check_method(args.method)
    for task in tasks:  # fail on missing QA files before loading a model
        if task.startswith("qa_"):
            find_qa_file(task_args(task)["dataset"], args.qa_dir)

    predict.set_seed(args.seed)
    model, tokenizer = predict.load_model_and_tokenizer(args)
    config = predict.method_config(args)
    chat = predict.uses_chat_template(tokenizer, args.chat_template)
    out_dir = os.path.join(args.save_dir, f"{predict.model_name(args)}_{args.max_capacity_prompts}")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and max(lengths) > max_positions:
        print(f"warning: context length {max(lengths)} exceeds the model's max_position_embeddings "
              f"{max_positions}", file=sys.stderr, flush=True)
    meta = {"benchmark": "RULER", "tasks": tasks, "context_lengths": lengths, "num_samples": args.num_samples,
            "generation_seed": args.seed, "chat_template_applied": chat, "dtype": str(model.dtype),
            "eval_batch_size": args.eval_batch_size, "essay_haystack": ESSAY_SOURCE,
            "tokens_to_generate": {t: tokens_to_generate(t) for t in tasks},
            "data_dir": args.data_dir, "decoding": "greedy",
            "data_sources": {f"{length}/{task}": data_source(args, task, length)
                             for length in lengths for task in tasks}}
    predict.write_run_meta(out_dir, args, meta)
    print(f"RULER {args.method} budget {args.max_capacity_prompts}; chat template: {'yes' if chat else 'no'}; "
          f"results -> {out_dir}", file=sys.stderr, flush=True)

    from tqdm import tqdm
    for length in lengths:
        for task in tasks:
            run_task(args, model, tokenizer, task, length, out_dir, config, chat, tqdm)


if __name__ == "__main__":
    sys.exit(predict.run_cli(main))
