"""One RULER table from a methods x budgets sweep: methods as rows, budgets as columns.

Reads {results_root}/{model_name}_{budget}/results.json written by eval.py (one per budget) and
prints, per context length, the average over tasks for each method and budget. FullKV keeps every
token, so it is run once and shown in every budget column (marked "*"). Also writes
{results_root}/sweep_{model_name}.csv and .json, and sweep_{model_name}.md: per context length, a
markdown table with one row per (method, budget) and one column per task plus the average.

    python scripts/scripts_ruler/sweep_table.py --results_root results_ruler \
        --model_name pyramidkv-tiny-llama --budgets 64,128,256
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from pyramidkv.method_flags import parse_budget_names as parse_budgets


def load_results(results_root: str, model_name: str, budgets: list) -> dict:
    """{length: {method: {budget: {task: score, "average": ...}}}} from the per-budget results.json files."""
    results: dict = {}
    for budget in budgets:
        path = os.path.join(results_root, f"{model_name}_{budget}", "results.json")
        if not os.path.exists(path):
            print(f"warning: {path} missing (no run for budget {budget}); its column stays empty",
                  file=sys.stderr)
            continue
        with open(path, encoding="utf-8") as f:
            per_method = json.load(f)
        for method, per_length in per_method.items():
            for length, scores in per_length.items():
                results.setdefault(int(length), {}).setdefault(method, {})[budget] = scores
    return results


def load_sweep(results: dict, budgets: list) -> dict:
    """{length: {method: {budget: average}}}; FullKV's one run fills every budget column."""
    table: dict = {}
    for length, per_method in results.items():
        for method, per_budget in per_method.items():
            cells = {b: scores.get("average") for b, scores in per_budget.items()}
            if method.lower() == "fullkv" and cells:  # FullKV does not depend on the budget
                value = next(iter(cells.values()))
                cells = {b: cells.get(b, value) for b in budgets}
            table.setdefault(length, {})[method] = cells
    return table


def load_per_task(results: dict) -> dict:
    """{length: {(method, budget): {task: score}}} (FullKV once, under the first budget it ran at)."""
    table: dict = {}
    for length, per_method in results.items():
        rows = table.setdefault(length, {})
        for method, per_budget in per_method.items():
            budgets = list(per_budget)[:1] if method.lower() == "fullkv" else list(per_budget)
            rows.update({(method, b): per_budget[b] for b in budgets})
    return table


def markdown_per_task(per_task: dict, method_order: list[str]) -> str:
    """One markdown table per context length: rows (method, budget), columns tasks + average."""
    blocks = []
    for length in sorted(per_task):
        rows = per_task[length]
        tasks = sorted({t for scores in rows.values() for t in scores if t != "average"})
        rank = {m: i for i, m in enumerate(method_order)}
        keys = sorted(rows, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1]))
        lines = [f"**{length} tokens**", "", "| method | budget | " + " | ".join(tasks) + " | average |",
                 "|---|---|" + "---|" * (len(tasks) + 1)]
        for method, budget in keys:
            scores = rows[(method, budget)]
            shown = "all" if method.lower() == "fullkv" else str(budget)
            cells = ["-" if scores.get(t) is None else f"{scores[t]:.1f}" for t in tasks + ["average"]]
            lines.append(f"| {method} | {shown} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_sweep(table: dict, budgets: list, method_order: list[str]) -> str:
    lines = []
    for length in sorted(table):
        per_method = table[length]
        methods = [m for m in method_order if m in per_method] + sorted(set(per_method) - set(method_order))
        header = [f"{length} tokens"] + [f"budget {b}" for b in budgets]
        rows = [[m + ("*" if m.lower() == "fullkv" else "")]
                + ["-" if per_method[m].get(b) is None else f"{per_method[m][b]:.2f}" for b in budgets]
                for m in methods]
        widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
        for row in [header] + rows:
            lines.append("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                                   for c, (cell, w) in enumerate(zip(row, widths))))
        lines.append("")
    if any(m.lower() == "fullkv" for per in table.values() for m in per):
        lines.append("* FullKV keeps the whole cache: one run, shown under every budget")
    return "\n".join(lines).rstrip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_root", required=True, help="save dir holding {model_name}_{budget}/")
    parser.add_argument("--model_name", required=True, help="basename of the model path")
    parser.add_argument("--budgets", required=True, help="comma list of budget names as in the directory names: max_capacity_prompts (128), ratios (keep0.25, compress0.4), quantized (512_kivi4)")
    parser.add_argument("--methods", default="", help="row order (comma list); others follow sorted")
    args = parser.parse_args(argv)
    try:
        budgets = parse_budgets(args.budgets)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = load_results(args.results_root, args.model_name, budgets)
    table = load_sweep(results, budgets)
    if not table:
        print(f"error: no results.json under {args.results_root}/{args.model_name}_<budget>/", file=sys.stderr)
        return 2
    order = [m for m in args.methods.replace(" ", ",").split(",") if m]
    print(format_sweep(table, budgets, order))
    stem = os.path.join(args.results_root, f"sweep_{args.model_name}")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({str(k): v for k, v in table.items()}, f, indent=2)
    with open(stem + ".csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["length", "method"] + budgets)
        for length in sorted(table):
            for method, cells in table[length].items():
                writer.writerow([length, method] + ["" if cells.get(b) is None else cells[b] for b in budgets])
    per_task = markdown_per_task(load_per_task(results), order)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(per_task + "\n")
    print()
    print(per_task)
    print(f"wrote {stem}.json, .csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
