"""Predict RULER answers with a KV-cache compression method.

    python run_ruler.py --method SnapKV --max_capacity_prompts 128 --context_lengths 4096,8192
    python run_ruler.py --method FullKV,SnapKV,PyramidKV --max_capacity_prompts 128,512   # one prefill each
    python run_ruler.py --method SnapKV,SimCalKV,CaM --keep_ratio 0.1,0.25,0.5   # ratio budgets

Samples come from {data_dir}/{length}/{task}.jsonl when --data_dir holds them (written by
`python -m pyramidkv.ruler`), otherwise they are generated on the fly with the model's own tokenizer
(deterministic in --seed). Writes {save_dir}/{model_name}_{budget}/{length}/{task}/{method}.json
(budget: tokens such as 128, compress0.4, keep0.25, or own for CS3602's self-sized methods; one JSON
line per sample: pred, outputs, length, index, depth; appended and flushed; a
rerun with the same settings skips finished indices, one with other settings is refused:
pyramidkv/results_dir.py) and run_meta.json. Flags, method config, model path, data files, save dir and
earlier results are all checked before the model loads. Sharded (pyramidkv/sharding.py): under
`accelerate launch --num_processes N run_ruler.py ...` (or torchrun) process r predicts the sample
indices i with i % N == r into {method}.json.part{r}of{N}; the last process to finish (or eval.py)
merges the parts into {method}.json. --device_map auto [--max_memory 0=20GiB,cpu=64GiB] splits a
large model over devices (pyramidkv/placement.py). Score with:
    python eval.py --results_dir {save_dir}/{model_name}_{budget}
"""
from __future__ import annotations

import argparse
import os
import sys

from pyramidkv import placement, predict, result_files, results_dir, sharding
from pyramidkv.ruler import DEFAULT_TASKS, TASKS, generate_sample, parse_task_list, tokens_to_generate
from pyramidkv.ruler.__main__ import add_depth_order_arg, parse_lengths
from pyramidkv.ruler.dataset import dataset_path, read_dataset, read_meta
from pyramidkv.ruler.haystacks import ESSAY_SOURCE
from pyramidkv.ruler.qa import find_qa_file, read_hotpotqa, read_squad
from pyramidkv.ruler.spec import task_args

DEFAULT_SAVE_DIR = "results_ruler"
GENERATED = "generated on the fly"
READ_QA = {"squad": read_squad, "hotpotqa": read_hotpotqa}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RULER predictions (Hsieh et al., 2024): synthetic long-context tasks generated "
                    "offline in the model's own tokens, greedy decoding, RULER's tokens_to_generate.")
    predict.add_common_args(parser, save_dir=DEFAULT_SAVE_DIR, sweep=True)
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
    add_depth_order_arg(g)
    return parser


def data_source(args, task: str, length: int) -> str:
    path = dataset_path(args.data_dir, length, task) if args.data_dir else None
    return path if path and os.path.exists(path) else GENERATED


def read_pregenerated(args, task: str, length: int) -> dict | None:
    """{index: sample} of the pre-generated file for (task, length), None when there is none; one-line
    errors for a bad file or missing indices."""
    path = data_source(args, task, length)
    if path == GENERATED:
        return None
    samples = {s["index"]: s for s in read_dataset(path)}
    missing = [i for i in range(args.num_samples) if i not in samples]
    if missing:
        raise predict.CLIError(f"{path} has no sample index {missing[0]} (needs 0..{args.num_samples - 1}); "
                               "regenerate it with python -m pyramidkv.ruler --num_samples N")
    meta = read_meta(path) or {}  # a corrupt .meta.json fails here, before the model loads
    made_order = meta.get("depth_order", "sequential") if meta else args.depth_order  # older files: grid order
    if made_order != args.depth_order:
        raise predict.CLIError(f"{path} was generated with --depth_order {made_order}, this run has "
                               f"--depth_order {args.depth_order}; pass --depth_order {made_order} or regenerate it")
    return samples


def sample_getter(args, tokenizer, task: str, length: int, chat: bool, samples: dict | None = None,
                  model_name: str | None = None):
    """index -> sample: from the pre-generated file when there is one, else generated now."""
    samples = read_pregenerated(args, task, length) if samples is None else samples
    if samples is not None:
        path = data_source(args, task, length)
        meta = read_meta(path) or {}
        made = {"seed": meta.get("seed"), "chat_template": meta.get("chat_template"), "tokenizer": meta.get("tokenizer")}
        now = {"seed": args.seed, "chat_template": chat, "tokenizer": model_name or made["tokenizer"]}
        if meta and made != now:
            print(f"warning: {path} was generated with {made}, this run uses {now}", file=sys.stderr, flush=True)
        return samples.__getitem__
    return lambda i: generate_sample(task, tokenizer, length, i, args.seed, chat_template=chat,
                                     qa_dir=args.qa_dir, depth_order=args.depth_order)


def results_path(out_dir: str, length: int, task: str, method: str) -> str:
    return os.path.join(out_dir, str(length), task, f"{method}.json")


def run_task(runs, model, tokenizer, task, length, tqdm, get_sample, batch_size,
             shard: sharding.Shard = sharding.Shard()) -> None:
    """Predict every pending sample of (task, length) this process owns (sample index i when
    i % world == rank, pyramidkv.sharding) for each run (one (method, budget) each).

    With several runs a prompt is prefilled once and decoded per run (predict.generate_many gives the
    same predictions as one generate each); a run that already has a sample is not decoded for it."""
    num_samples = runs[0].args.num_samples
    for run in runs:
        results_file = results_path(run.out_dir, length, task, run.args.method)
        run.out_path = sharding.part_path(results_file, shard)  # the file itself for one process
        run.done = sharding.done_ids(results_file, "index", shard)  # in the file or any part of it
    owned = [i for i in range(num_samples) if shard.owns(i)]
    pending = sorted({i for run in runs for i in owned if i not in run.done})
    progress = tqdm(total=len(owned), initial=len(owned) - len(pending), desc=f"{task}@{length}",
                    unit="sample", postfix=f"{len(runs)} method x budget" if len(runs) > 1 else None)
    for start in range(0, len(pending), batch_size):
        batch = [get_sample(i) for i in pending[start:start + batch_size]]
        active = [run for run in runs if any(s["index"] not in run.done for s in batch)]
        prompts = [s["input"] for s in batch]
        max_new = max(s["tokens_to_generate"] for s in batch)
        if len(active) == 1:
            preds = [predict.generate(model, tokenizer, prompts, max_new, active[0].args.method, active[0].config)]
        else:
            preds = predict.generate_many(model, tokenizer, prompts, max_new,
                                          [(run.args.method, run.config) for run in active])
        for run, run_preds in zip(active, preds):
            for sample, pred in zip(batch, run_preds):
                if sample["index"] not in run.done:
                    result_files.append_jsonl(run.out_path, {
                        "pred": pred, "outputs": sample["outputs"], "length": sample["length"],
                        "index": sample["index"], "depth": sample.get("depth")})
        progress.update(len(batch))
    progress.close()


class Run:
    """One (method, budget) of a run_ruler invocation: its flags, results directory and settings."""

    def __init__(self, args, resolved):
        self.args = args
        self.config = predict.method_config(args)
        self.out_dir = os.path.join(args.save_dir, f"{resolved.name}_{predict.budget_name(args)}")
        real = (lambda path: os.path.realpath(path) if path else None)
        self.settings = results_dir.run_settings(args, {"benchmark": "RULER", "data_dir": real(args.data_dir),
                                                        "qa_dir": real(args.qa_dir),
                                                        "depth_order": args.depth_order})


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        tasks = parse_task_list(args.tasks)
        lengths = parse_lengths(args.context_lengths)
    except ValueError as err:
        raise predict.CLIError(str(err)) from None
    if args.num_samples < 1:
        raise predict.CLIError(f"--num_samples {args.num_samples} must be at least 1")
    sweep = predict.expand_sweep(args)  # one namespace per (method, budget), names canonical
    for one in sweep:
        predict.validate_run_args(one)
    for task in tasks:  # fail on missing or unreadable QA files before loading a model (reads are cached)
        if task.startswith("qa_"):
            dataset = task_args(task)["dataset"]
            READ_QA[dataset](find_qa_file(dataset, args.qa_dir))
    resolved = predict.resolve_model(args)
    runs = [Run(one, resolved) for one in sweep]
    if args.print_results_dir:  # the names only: eval.sh asks before the real run, which reads the data
        print("\n".join(run.out_dir for run in runs))
        return
    pregenerated = {(length, task): read_pregenerated(args, task, length) for length in lengths for task in tasks}
    fingerprint = resolved.fingerprint()
    for run in runs:
        results_dir.check_writable(args.save_dir, run.out_dir)
        results_dir.check_settings(run.out_dir, run.settings, fingerprint)
    paths = [results_path(run.out_dir, length, task, run.args.method)
             for run in runs for length in lengths for task in tasks]
    shard = sharding.current_shard()
    with results_dir.locked(paths, shard):
        predict.set_seed(args.seed)
        model, tokenizer = predict.load_model_and_tokenizer(args, shard)
        chat = predict.uses_chat_template(tokenizer, args.chat_template)
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
                                 for length in lengths for task in tasks},
                **placement.placement_record(model, args, shard)}
        for run in runs:
            if shard.rank == 0:  # one writer per invocation, however many processes share it
                predict.write_run_meta(run.out_dir, run.args, meta, run.settings)
            print(f"RULER {run.args.method} budget {predict.budget_name(run.args)}; chat template: "
                  f"{'yes' if chat else 'no'}; results -> {run.out_dir}", file=sys.stderr, flush=True)

        from tqdm import tqdm
        for length in lengths:
            for task in tasks:
                get_sample = sample_getter(args, tokenizer, task, length, chat, pregenerated[(length, task)],
                                           resolved.name)
                run_task(runs, model, tokenizer, task, length, tqdm, get_sample, args.eval_batch_size, shard)
    sharding.merge_at_end(paths, "index", shard)


if __name__ == "__main__":
    sys.exit(predict.run_cli(main))
