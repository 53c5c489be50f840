"""Predict LongBench (v1 / LongBench-E) answers with a KV-cache compression method.

    python run_longbench.py --method PyramidKV --max_capacity_prompts 128
    python run_longbench.py --method FullKV,SnapKV,PyramidKV --max_capacity_prompts 128,512   # one prefill each
    python run_longbench.py --method SimCalKV --compress_ratio 0.4 --sim_threshold 0.8   # ratio budget

Writes {save_dir}/{model_name}_{budget}/{dataset}/{method}.json (budget: tokens such as 128, compress0.4,
keep0.25, or own for CS3602's self-sized methods; one JSON line per sample, appended and flushed; a rerun with the same settings skips finished _ids, one with other
settings is refused: pyramidkv/results_dir.py) and run_meta.json beside the dataset directories. Comma
lists of methods and budgets write one such directory per budget (FullKV once, under the first budget)
and prefill each prompt once for all of them (predict.generate_many: the same predictions as one run
each).
Everything (flags, method config, model path, data files, save dir, earlier results) is checked before
the model loads. Sharded (pyramidkv/sharding.py): under `accelerate launch --num_processes N
run_longbench.py ...` (or torchrun) process r predicts the i-th distinct _id of each dataset when
i % N == r, into {method}.json.part{r}of{N}; the last process (or eval.py) merges the parts.
--device_map auto [--max_memory ...] splits a large model over devices (pyramidkv/placement.py). Score with: python eval.py --results_dir {save_dir}/{model_name}_{budget}
"""
from __future__ import annotations

import argparse
import os
import sys

from pyramidkv import longbench as lb
from pyramidkv import placement, predict, result_files, results_dir, sharding

DEFAULT_SAVE_DIR = "results_long_bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LongBench predictions with the official protocol (prompts, middle truncation, "
                    "greedy decoding, official max new tokens).")
    predict.add_common_args(parser, save_dir=DEFAULT_SAVE_DIR, sweep=True)
    g = parser.add_argument_group("LongBench")
    g.add_argument("--datasets", default=None,
                   help="comma list of datasets; default: the 16 English sets (13 with --longbench_e); "
                        "'all' = all 21 (13 for LongBench-E) (default: the English sets)")
    g.add_argument("--longbench_e", action="store_true",
                   help="LongBench-E: read {dataset}_e.jsonl, write {dataset}_e/ directories (default: off)")
    g.add_argument("--data_dir", default=None,
                   help="directory with {dataset}.jsonl (default: data/LongBench; when absent, the "
                        "bundled smoke sample data/longbench_smoke, which is NOT LongBench)")
    g.add_argument("--from_hub", action="store_true",
                   help=f"load the data from the hub ({lb.HUB_REPO}, needs the `datasets` package) (default: off, local files)")
    g.add_argument("--max_num_examples", type=int, default=None, help="first N samples per dataset (default: all)")
    g.add_argument("--max_length", type=int, default=None,
                   help="max prompt tokens before middle truncation (default: official value for "
                        "known models, else max_position_embeddings - 500)")
    return parser


def load_samples(args, datasets: list[str], data_dir: str) -> dict[str, list[dict]]:
    samples = {}
    for dataset in datasets:
        if args.from_hub:
            rows = lb.load_hub_samples(dataset, args.longbench_e)
        else:
            rows = lb.load_jsonl_samples(lb.data_file(data_dir, dataset, args.longbench_e), dataset)
        samples[dataset] = rows[: args.max_num_examples] if args.max_num_examples else rows
    return samples


def build_model_prompt(tokenizer, dataset: str, sample: dict, max_length: int, chat_mode: str):
    """Official prompt -> middle truncation -> chat template (skipped for few-shot/code sets)."""
    prompt, prompt_tokens = lb.truncate_middle(tokenizer, lb.build_prompt(dataset, sample), max_length)
    if lb.wants_chat_template(dataset):
        prompt = predict.apply_chat_template(tokenizer, prompt, chat_mode)
    return prompt, prompt_tokens


class Run:
    """One (method, budget) of a run_longbench invocation: its flags, results directory and settings."""

    def __init__(self, args, resolved, data: str):
        self.args = args
        self.config = predict.method_config(args)
        self.out_dir = os.path.join(args.save_dir, f"{resolved.name}_{predict.budget_name(args)}")
        self.settings = results_dir.run_settings(args, {"benchmark": "LongBench", "max_length": args.max_length,
                                                        "data": data})
        self.out_path = self.done = None  # set per dataset by run_dataset


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_num_examples is not None and args.max_num_examples < 1:
        raise predict.CLIError(f"--max_num_examples {args.max_num_examples} must be at least 1")
    if args.max_length is not None and args.max_length <= 1:
        raise predict.CLIError(f"--max_length {args.max_length} is too small; give at least 2 tokens")
    sweep = predict.expand_sweep(args)  # one namespace per (method, budget), names canonical
    for one in sweep:
        predict.validate_run_args(one)
    datasets = lb.parse_datasets(args.datasets, args.longbench_e)
    data_dir, data_source = (None, "hub") if args.from_hub else lb.resolve_data_dir(args.data_dir)
    if data_source == "smoke" and args.longbench_e:
        raise predict.CLIError(f"LongBench-E needs {lb.DEFAULT_DATA_DIR}/{{dataset}}_e.jsonl files (the bundled "
                               "smoke sample has none); unzip LongBench's data.zip there or pass --data_dir")
    resolved = predict.resolve_model(args)
    runs = [Run(one, resolved, "hub" if args.from_hub else os.path.realpath(data_dir)) for one in sweep]
    if args.print_results_dir:  # the names only: eval.sh asks before the real run, which reads the data
        print("\n".join(run.out_dir for run in runs))
        return
    if data_source == "smoke":
        print(f"note: {lb.DEFAULT_DATA_DIR} not found; using the bundled smoke sample {data_dir} "
              "(self-written text in LongBench format, NOT LongBench: scores are not comparable "
              "to published tables)", file=sys.stderr, flush=True)
    samples = load_samples(args, datasets, data_dir)  # fail on missing/bad data before loading a model
    fingerprint = resolved.fingerprint()
    for run in runs:
        results_dir.check_writable(args.save_dir, run.out_dir)
        results_dir.check_settings(run.out_dir, run.settings, fingerprint)
    dir_names = [f"{d}_e" if args.longbench_e else d for d in datasets]
    paths = [os.path.join(run.out_dir, name, f"{run.args.method}.json") for run in runs for name in dir_names]
    shard = sharding.current_shard()
    with results_dir.locked(paths, shard):
        predict.set_seed(args.seed)
        model, tokenizer = predict.load_model_and_tokenizer(args, shard)
        max_length, max_length_source = lb.model_max_length(resolved.name, model.config, args.max_length)
        chat = predict.uses_chat_template(tokenizer, args.chat_template)
        meta = {"benchmark": "LongBench-E" if args.longbench_e else "LongBench",
                "data_source": data_source, "data_dir": data_dir, "datasets": datasets,
                "max_length": max_length, "max_length_source": max_length_source,
                "chat_template_applied": chat, "dtype": str(model.dtype), "eval_batch_size": args.eval_batch_size,
                "max_new_tokens": {d: lb.DATASET_TO_MAX_NEW_TOKENS[d] for d in datasets},
                **lb.protocol_record(), **placement.placement_record(model, args, shard)}
        print(f"model max prompt length {max_length} ({max_length_source}); chat template: "
              f"{'yes' if chat else 'no'}", file=sys.stderr, flush=True)
        for run in runs:
            if shard.rank == 0:  # one writer per invocation, however many processes share it
                predict.write_run_meta(run.out_dir, run.args, meta, run.settings)
            print(f"LongBench {run.args.method} budget {predict.budget_name(run.args)}; results -> "
                  f"{run.out_dir}", file=sys.stderr, flush=True)

        from tqdm import tqdm
        for dataset in datasets:
            run_dataset(args, runs, model, tokenizer, dataset, samples[dataset], max_length, tqdm, shard)
    sharding.merge_at_end(paths, "_id", shard)


def run_dataset(args, runs, model, tokenizer, dataset, samples, max_length, tqdm,
                shard: sharding.Shard = sharding.Shard()) -> None:
    """Predict every pending sample of one dataset this process owns (the i-th distinct _id when
    i % world == rank, pyramidkv.sharding) for each run (one (method, budget) each).

    With several runs a prompt is prefilled once and decoded per run (predict.generate_many gives the
    same predictions as one generate each); a run that already has a sample is not decoded for it."""
    dir_name = f"{dataset}_e" if args.longbench_e else dataset
    for run in runs:
        results_file = os.path.join(run.out_dir, dir_name, f"{run.args.method}.json")
        run.out_path = sharding.part_path(results_file, shard)  # the file itself for one process
        run.done = sharding.done_ids(results_file, "_id", shard)  # in the file or any part of it
    unique, seen = [], set()
    for sample in samples:
        if sample["_id"] not in seen:  # also guards against repeated ids in the data file
            seen.add(sample["_id"])
            unique.append(sample)
    unique = [s for position, s in enumerate(unique) if shard.owns(position)]
    pending = [s for s in unique if any(s["_id"] not in run.done for run in runs)]
    max_new_tokens = lb.DATASET_TO_MAX_NEW_TOKENS[dataset]
    stop = lb.STOP_STRINGS.get(dataset)
    progress = tqdm(total=len(unique), initial=len(unique) - len(pending), desc=dir_name, unit="sample",
                    postfix=f"{len(runs)} method x budget" if len(runs) > 1 else None)
    for start in range(0, len(pending), args.eval_batch_size):
        batch = pending[start:start + args.eval_batch_size]
        active = [run for run in runs if any(s["_id"] not in run.done for s in batch)]
        built = [build_model_prompt(tokenizer, dataset, s, max_length, args.chat_template) for s in batch]
        prompts = [p for p, _ in built]
        if len(active) == 1:
            preds = [predict.generate(model, tokenizer, prompts, max_new_tokens, active[0].args.method,
                                      active[0].config, stop_strings=stop)]
        else:
            preds = predict.generate_many(model, tokenizer, prompts, max_new_tokens,
                                          [(run.args.method, run.config) for run in active], stop_strings=stop)
        for run, run_preds in zip(active, preds):
            for sample, pred, (_, prompt_tokens) in zip(batch, run_preds, built):
                if sample["_id"] in run.done:
                    continue
                result_files.append_jsonl(run.out_path, {
                    "pred": pred, "answers": sample["answers"], "all_classes": sample.get("all_classes"),
                    "length": sample["length"], "_id": sample["_id"], "dataset": dir_name,
                    "language": sample.get("language"), "prompt_tokens": prompt_tokens,
                    "truncated": prompt_tokens > max_length,
                })
        progress.update(len(batch))
    progress.close()


if __name__ == "__main__":
    sys.exit(predict.run_cli(main))
