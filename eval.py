"""Score prediction files with the official metrics and write results.json / results.csv.

    python eval.py --results_dir results/pyramidkv-tiny-llama_128            # LongBench tree
    python eval.py --results_dir results/pyramidkv-tiny-llama_128 --longbench_e
    python eval.py --results_dir results_ruler/pyramidkv-tiny-llama_128      # RULER tree (auto)

LongBench tree: {results_dir}/{dataset}/{method}.json; RULER tree: {results_dir}/{length}/{task}/
{method}.json. Method names are the file names as found. Malformed or non-UTF-8 lines are reported with
file:line and skipped (never counted as zero); repeated ids are counted once. Part files a sharded run
left ({method}.json.part{r}of{N}, pyramidkv/sharding.py) are merged into {method}.json first (or, while
a run still writes them, scored as they are). A tree that holds both
LongBench and RULER results is refused unless --benchmark picks one (the runners default to separate
roots, results_long_bench/ and results_ruler/). The table is printed before results.json/.csv are
written; when they cannot be written (read-only directory) a one-line warning says so.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from pyramidkv import longbench as lb
from pyramidkv import metrics, sharding
from pyramidkv.result_files import iter_jsonl

EN_AVERAGE = "average_english"  # mean over the English LongBench sets present
ALL_AVERAGE = "average"         # mean over every dataset (or task) present


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_predictions(path: str, required: tuple, id_key: str) -> list[dict]:
    """Valid records of a jsonl prediction file and of the part files a sharded run left beside it
    (merged into it first, unless a run still writes them: then read as they are); bad lines are
    reported (file:line) and skipped."""
    if sharding.merge_parts(path, id_key) is False:
        warn(f"{path}: its part files were not merged (a run still writes them, or the directory is "
             "read-only); scored as they are")
    records, seen = [], set()
    for file in [p for p in [path, *sharding.part_files(path)] if os.path.exists(p)]:
        for line_no, record, error, missing in iter_jsonl(file, required):
            if error is not None:
                warn(f"{file}:{line_no}: {error}; line skipped")
                continue
            if missing:
                warn(f"{file}:{line_no}: missing {', '.join(missing)}; line skipped")
                continue
            if not isinstance(record["pred"], str):
                warn(f"{file}:{line_no}: pred is {type(record['pred']).__name__}, not a string; line skipped")
                continue
            key = record.get(id_key)
            if key is not None and key in seen:
                warn(f"{file}:{line_no}: repeated {id_key} {key!r}; counted once")
                continue
            seen.add(key)
            records.append(record)
    return records


def method_files(directory: str) -> list[tuple[str, str]]:
    """(method, path) for every {method}.json in a directory, sorted by method (a method whose sharded
    run left only part files, {method}.json.part0of2 ..., too: scoring merges them)."""
    found = []
    names = os.listdir(directory)
    names += [sharding.results_file_of(n) for n in names if sharding.is_part_file(n)]
    for name in sorted(set(names)):
        path = os.path.join(directory, name)
        if not name.endswith(".json"):
            continue
        if os.path.isdir(path):
            warn(f"{path}: a directory, not a prediction file; skipped")
            continue
        found.append((name[:-5], path))
    return found


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


# ----------------------------------------------------------------------------- LongBench

def find_longbench_dirs(results_dir: str, longbench_e: bool) -> list[tuple[str, str]]:
    """(dataset, directory) pairs; LongBench-E uses {dataset}_e directories."""
    found = []
    for name in sorted(os.listdir(results_dir)):
        path = os.path.join(results_dir, name)
        if not os.path.isdir(path):
            continue
        is_e = name.endswith("_e") and name[:-2] in metrics.DATASET_TO_METRIC
        dataset = name[:-2] if is_e else name
        if dataset not in metrics.DATASET_TO_METRIC:
            if not name.isdigit():
                warn(f"{path}: not a LongBench dataset directory; skipped")
            continue
        if is_e == longbench_e:
            found.append((dataset, path))
    return found


def score_longbench(results_dir: str, longbench_e: bool = False) -> dict:
    """{method: {dataset: score}} (LongBench-E: {method: {dataset: {bucket: score}}})."""
    results: dict = {}
    for dataset, directory in find_longbench_dirs(results_dir, longbench_e):
        for method, path in method_files(directory):
            records = read_predictions(path, ("pred", "answers", "length"), "_id")
            if not records:
                warn(f"{path}: no valid predictions; not scored")
                continue
            preds = [r["pred"] for r in records]
            answers = [r["answers"] for r in records]
            classes = [r.get("all_classes") for r in records]
            if longbench_e:
                score = metrics.longbench_e_scores(dataset, preds, answers, [r["length"] for r in records],
                                                   classes)
            else:
                score = metrics.longbench_score(dataset, preds, answers, classes)
            results.setdefault(method, {})[dataset] = score
    if not longbench_e:
        for scores in results.values():
            english = [scores[d] for d in lb.ENGLISH_DATASETS if d in scores]
            scores[EN_AVERAGE] = _mean(english)
            scores[ALL_AVERAGE] = _mean([v for k, v in scores.items() if k in metrics.DATASET_TO_METRIC])
    return by_method_name(results)


def by_method_name(results: dict) -> dict:
    return {m: results[m] for m in sorted(results, key=lambda m: (m.lower(), m))}


def longbench_table(results: dict, longbench_e: bool) -> tuple[list[str], list[list]]:
    """CSV/print rows: one per method (LongBench-E: one per method and bucket)."""
    present = {d for scores in results.values() for d in scores if d in metrics.DATASET_TO_METRIC}
    datasets = [d for d in lb.ALL_DATASETS if d in present]
    if longbench_e:
        header = ["method", "bucket"] + datasets
        rows = [[m, b] + [results[m].get(d, {}).get(b) for d in datasets]
                for m in results for b in metrics.LONGBENCH_E_BUCKETS]
        return header, rows
    header = ["method"] + datasets + [EN_AVERAGE, ALL_AVERAGE]
    return header, [[m] + [results[m].get(c) for c in header[1:]] for m in results]


# ----------------------------------------------------------------------------- RULER

def is_ruler_tree(results_dir: str) -> bool:
    return bool(ruler_length_dirs(results_dir))


def ruler_length_dirs(results_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(results_dir)
                  if name.isdigit() and os.path.isdir(os.path.join(results_dir, name)))


def longbench_dataset_dirs(results_dir: str) -> list[str]:
    names = []
    for name in sorted(os.listdir(results_dir)):
        dataset = name[:-2] if name.endswith("_e") else name
        if dataset in metrics.DATASET_TO_METRIC and os.path.isdir(os.path.join(results_dir, name)):
            names.append(name)
    return names


def score_ruler(results_dir: str) -> dict:
    """{method: {length: {task: score, ..., "average": mean over tasks present}}}."""
    results: dict = {}
    lengths = sorted((n for n in os.listdir(results_dir)
                      if n.isdigit() and os.path.isdir(os.path.join(results_dir, n))), key=int)
    for length in lengths:
        length_dir = os.path.join(results_dir, length)
        for task in sorted(os.listdir(length_dir)):
            task_dir = os.path.join(length_dir, task)
            if not os.path.isdir(task_dir):
                continue
            if task not in metrics.RULER_TASK_TO_METRIC:
                warn(f"{task_dir}: unknown RULER task (valid: {', '.join(metrics.RULER_TASK_TO_METRIC)}); "
                     "skipped")
                continue
            for method, path in method_files(task_dir):
                records = read_predictions(path, ("pred", "outputs"), "index")
                if not records:
                    warn(f"{path}: no valid predictions; not scored")
                    continue
                preds = [metrics.ruler_postprocess(r["pred"]) for r in records]
                score = metrics.RULER_TASK_TO_METRIC[task](preds, [r["outputs"] for r in records])
                results.setdefault(method, {}).setdefault(int(length), {})[task] = score
    for per_length in results.values():
        for scores in per_length.values():
            scores[ALL_AVERAGE] = _mean(list(scores.values()))
    return by_method_name(results)


def ruler_table(results: dict) -> tuple[list[str], list[list]]:
    order = list(metrics.RULER_TASK_TO_METRIC)
    present = {t for per in results.values() for s in per.values() for t in s if t != ALL_AVERAGE}
    tasks = [t for t in order if t in present]
    header = ["method", "length"] + tasks + [ALL_AVERAGE]
    rows = [[m, length] + [scores.get(c) for c in header[2:]]
            for m, per in results.items() for length, scores in sorted(per.items())]
    return header, rows


# ----------------------------------------------------------------------------- output

def write_csv(path: str, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def format_table(header: list[str], rows: list[list], key_columns: int) -> str:
    """Transposed text table: one line per column of the CSV, one column per CSV row."""
    labels = ["/".join(str(v) for v in row[:key_columns]) for row in rows]
    lines = [[""] + labels]
    for i, name in enumerate(header[key_columns:], key_columns):
        lines.append([name] + ["-" if row[i] is None else f"{row[i]:.2f}" for row in rows])
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def smoke_note(results_dir: str) -> str | None:
    path = os.path.join(results_dir, "run_meta.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warn(f"{path} is not readable JSON ({err}); scored without it")
        return None
    if not isinstance(meta, dict):
        return None
    smoke = sorted(m for m, e in meta.items()
                   if isinstance(e, dict) and e.get("protocol", {}).get("data_source") == "smoke")
    if smoke:
        return (f"note: {', '.join(smoke)} ran on the bundled smoke sample (NOT LongBench); "
                "these numbers only show the pipeline works")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", required=True,
                        help="{save_dir}/{model_name}_{max_capacity_prompts} written by run_longbench.py "
                             "or run_ruler.py")
    parser.add_argument("--longbench_e", action="store_true",
                        help="score {dataset}_e directories per length bucket (0-4k, 4-8k, 8k+); "
                             "writes results_e.json / results_e.csv (default: off)")
    parser.add_argument("--benchmark", default="auto", choices=("auto", "longbench", "ruler"),
                        help="auto: RULER when the tree has numeric length directories, LongBench otherwise; "
                             "a tree with both is refused (default: auto)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.results_dir):
        what = "is not a directory" if os.path.exists(args.results_dir) else "does not exist"
        print(f"error: results directory {args.results_dir!r} {what}", file=sys.stderr)
        return 2
    lengths, datasets = ruler_length_dirs(args.results_dir), longbench_dataset_dirs(args.results_dir)
    if args.benchmark == "auto" and lengths and datasets:
        print(f"error: {args.results_dir} mixes RULER results ({', '.join(lengths[:3])}/) and LongBench results "
              f"({', '.join(datasets[:3])}/); pass --benchmark ruler or --benchmark longbench to score one "
              "(the runners' default roots keep them apart: results_ruler/, results_long_bench/)", file=sys.stderr)
        return 2
    ruler = args.benchmark == "ruler" or (args.benchmark == "auto" and bool(lengths))
    if ruler:
        results = score_ruler(args.results_dir)
        header, rows = ruler_table(results)
        key_columns, stem = 2, "results"
        json_results = {m: {str(k): v for k, v in per.items()} for m, per in results.items()}
    else:
        results = score_longbench(args.results_dir, args.longbench_e)
        header, rows = longbench_table(results, args.longbench_e)
        key_columns = 2 if args.longbench_e else 1
        stem = "results_e" if args.longbench_e else "results"
        json_results = results
    if not results:
        print(f"error: no prediction files found under {args.results_dir}", file=sys.stderr)
        return 2
    print(format_table(header, rows, key_columns))  # before writing: a read-only tree still gets its table
    note = smoke_note(args.results_dir)
    if note:
        print(note)
    try:
        with open(os.path.join(args.results_dir, f"{stem}.json"), "w", encoding="utf-8") as f:
            json.dump(json_results, f, indent=2)
        write_csv(os.path.join(args.results_dir, f"{stem}.csv"), header, rows)
    except OSError as err:
        warn(f"could not write {os.path.join(args.results_dir, stem)}.json/.csv ({err.strerror or err}); "
             "the table above is not saved")
        return 0
    print(f"wrote {os.path.join(args.results_dir, stem)}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
