"""One LongBench table from a methods x budgets sweep: methods as rows, budgets as columns.

Reads {results_root}/{model_name}_{budget}/results.json written by eval.py (one per budget) and
prints the LongBench average (over every dataset present) for each method and budget, then one row
per (method, budget) with every dataset's score. FullKV keeps every token, so it is run once and shown
in every budget column (marked "*"). When any run used the bundled smoke sample (run_meta.json
data_source "smoke") every table is titled NOT LongBench. Writes {results_root}/sweep_{model_name}.md
(both tables), .csv (one row per method and budget, every dataset) and .json.

    python scripts/scripts_longBench/sweep_table.py --results_root results_long_bench \
        --model_name SmolLM2-135M-Instruct --budgets 128,512
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from pyramidkv.longbench import ALL_DATASETS
from pyramidkv.method_flags import parse_budget_names as parse_budgets

SMOKE_TITLE = ("LongBench protocol on the bundled smoke sample (data/longbench_smoke) -- NOT LongBench: "
               "self-written text in LongBench format; not comparable to published tables")
AVERAGES = ("average_english", "average")


def load_results(results_root: str, model_name: str, budgets: list) -> tuple[dict, set]:
    """({method: {budget: {dataset: score, average_english, average}}}, data sources from run_meta)."""
    results: dict = {}
    sources: set = set()
    for budget in budgets:
        directory = os.path.join(results_root, f"{model_name}_{budget}")
        path = os.path.join(directory, "results.json")
        if not os.path.exists(path):
            print(f"warning: {path} missing (no run for budget {budget}); its column stays empty", file=sys.stderr)
            continue
        with open(path, encoding="utf-8") as f:
            for method, scores in json.load(f).items():
                results.setdefault(method, {})[budget] = scores
        meta_path = os.path.join(directory, "run_meta.json")
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as f:
                sources |= {e.get("protocol", {}).get("data_source") for e in json.load(f).values()}
    return results, sources - {None}


def table_title(sources: set) -> str:
    """What the numbers are, from the runs' data sources (smoke wins: one smoke run taints the table)."""
    if "smoke" in sources:
        return SMOKE_TITLE
    named = {"LongBench": "LongBench (data/LongBench)", "hub": "LongBench (THUDM/LongBench from the hub)",
             "user": "LongBench protocol on --data_dir files"}
    return "; ".join(named.get(s, s) for s in sorted(sources)) or "LongBench protocol (data source not recorded)"


def ordered(methods, order: list[str]) -> list[str]:
    return [m for m in order if m in methods] + sorted(set(methods) - set(order))


def rows_per_budget(results: dict, budgets: list, order: list[str]) -> list[tuple[str, int | None, dict]]:
    """(method, budget, scores) rows; FullKV once (budget None), from the first budget it ran at."""
    rows = []
    for method in ordered(results, order):
        per_budget = results[method]
        if method.lower() == "fullkv":
            rows.append((method, None, per_budget[next(iter(per_budget))]))
        else:
            rows.extend((method, b, per_budget[b]) for b in budgets if b in per_budget)
    return rows


def averages(results: dict, budgets: list) -> dict:
    """{method: {budget: LongBench average}}; FullKV's one run fills every budget column."""
    table = {}
    for method, per_budget in results.items():
        cells = {b: per_budget[b].get("average") for b in budgets if b in per_budget}
        if method.lower() == "fullkv" and cells:  # FullKV does not depend on the budget
            cells = dict.fromkeys(budgets, next(iter(cells.values())))
        table[method] = cells
    return table


def average_table(table: dict, budgets: list, order: list[str]) -> str:
    """Markdown: methods x budgets, the LongBench average."""
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for method in ordered(table, order):
        star = "*" if method.lower() == "fullkv" else ""
        lines.append(f"| {method}{star} | " + " | ".join(_cell(table[method].get(b)) for b in budgets) + " |")
    return "\n".join(lines)


def dataset_table(rows: list, datasets: list[str]) -> str:
    """Markdown: one row per (method, budget), one column per dataset plus the two averages."""
    columns = datasets + list(AVERAGES)
    lines = ["| method | budget | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for method, budget, scores in rows:
        shown = "all" if budget is None else str(budget)
        lines.append(f"| {method} | {shown} | " + " | ".join(_cell(scores.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_root", required=True, help="save dir holding {model_name}_{budget}/")
    parser.add_argument("--model_name", required=True,
                        help="the resolved model name in the directory names (e.g. SmolLM2-135M-Instruct)")
    parser.add_argument("--budgets", required=True, help="comma list of budget names as in the directory names: max_capacity_prompts (128), ratios (keep0.25, compress0.4), quantized (512_kivi4)")
    parser.add_argument("--methods", default="", help="row order (comma list); others follow sorted (default: sorted)")
    args = parser.parse_args(argv)
    try:
        budgets = parse_budgets(args.budgets)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        results, sources = load_results(args.results_root, args.model_name, budgets)
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        print(f"error: cannot read the results under {args.results_root}: {err}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: no results.json under {args.results_root}/{args.model_name}_<budget>/ for budgets "
              f"{args.budgets}; run eval.py --results_dir on each first", file=sys.stderr)
        return 2
    order = [m for m in args.methods.replace(" ", ",").split(",") if m]
    present = {d for per in results.values() for scores in per.values() for d in scores}
    datasets = [d for d in ALL_DATASETS if d in present]
    rows = rows_per_budget(results, budgets, order)
    title = table_title(sources)
    text = "\n\n".join([f"**{title}** -- {args.model_name}, {len(datasets)} datasets, LongBench average",
                        average_table(averages(results, budgets), budgets, order),
                        "* FullKV keeps the whole cache: one run, shown under every budget",
                        dataset_table(rows, datasets)]) + "\n"
    print(text)
    stem = os.path.join(args.results_root, f"sweep_{args.model_name}")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    with open(stem + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "budget"] + datasets + list(AVERAGES))
        for method, budget, scores in rows:
            writer.writerow([method, "all" if budget is None else budget]
                            + ["" if scores.get(c) is None else scores[c] for c in datasets + list(AVERAGES)])
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"title": title, "model": args.model_name, "budgets": budgets,
                   "average": {m: {str(b): v for b, v in cells.items()}
                               for m, cells in averages(results, budgets).items()},
                   "per_dataset": [{"method": m, "budget": b, "scores": s} for m, b, s in rows]}, f, indent=2)
    print(f"wrote {stem}.md, .csv and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
