"""RULER tables with binomial standard errors, straight from a sweep's prediction files.

eval.py scores whatever a prediction file holds; while a sweep is being extended (10 -> 50 samples)
its files hold different counts per task, and results.json mixes them. This script scores, per
(method, budget, task), the samples with index < --num_samples only, and prints each cell as its
score with the sample count and the standard error of the mean: sqrt(p (1 - p) / n) for 0/1 scores
(RULER's string match on one needle), the same formula with the per-sample variance otherwise.
Cells that hold fewer samples than asked for are shown with their count (never padded or dropped).
`--paired A,B` adds, per task and budget, the prompts where only A or only B is right and an exact
sign test: every method of a sweep answers the same prompts, so this separates two methods far more
sharply than their cells' errors do. It only reads: prediction files and results.json stay as they are.

    python scripts/scripts_ruler/sample_table.py \
        --results_root benchmarks/ruler_smollm2/window8/results_ruler \
        --model_name SmolLM2-135M-Instruct --budgets 64,128,256,512,1024 \
        --tasks niah_single_1,niah_single_2 --num_samples 50 --paired PyramidKV,SnapKV --out table.md
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

from pyramidkv import metrics
from pyramidkv.method_flags import parse_budget_names
from pyramidkv.result_files import iter_jsonl


def per_sample_scores(path: str, task: str, num_samples: int, leads: dict | None = None) -> dict:
    """{index: score 0-100} of the samples with index < num_samples (the first line of an index
    counts); bad lines warned and skipped, as eval.py does. `leads`, when given, receives {index:
    ("digits" or "uuid", leading value characters the answer reproduces)} for samples with one
    needle value that is a number or a UUID."""
    metric = metrics.RULER_TASK_TO_METRIC[task]
    scores: dict = {}
    for line_no, record, error, missing in iter_jsonl(path, ("pred", "outputs", "index")):
        if error or missing or not isinstance(record["pred"], str):
            print(f"warning: {path}:{line_no}: {error or 'missing ' + ', '.join(missing) or 'pred not a string'}; "
                  "line skipped", file=sys.stderr)
            continue
        index = record["index"]
        if index in scores or not (isinstance(index, int) and 0 <= index < num_samples):
            continue
        scores[index] = metric([metrics.ruler_postprocess(record["pred"])], [record["outputs"]])
        value = str(record["outputs"][0]) if len(record["outputs"]) == 1 else ""
        if leads is not None and value.isdigit():
            leads[index] = ("digits", metrics.leading_digits(record["pred"], value))
        elif leads is not None and metrics.UUID.fullmatch(value):
            leads[index] = ("uuid", metrics.leading_uuid_chars(record["pred"], value))
    return scores


def cell(by_index: dict) -> dict:
    """Mean, standard error of the mean and count of one cell's per-sample scores (kept by index for
    the paired comparison)."""
    scores = list(by_index.values())
    n = len(scores)
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / n  # = p (1 - p) x 100^2 for 0/100 scores
    return {"mean": mean, "se": math.sqrt(variance / n), "n": n, "by_index": by_index}


def collect(results_root: str, model_name: str, budgets: list, tasks: list, length: str,
            num_samples: int, label: str = "", table: dict | None = None) -> dict:
    """{task: {method: {budget: cell}}}; FullKV (run once, in one budget's directory) under "all".
    With a label, the root's methods are added to `table` as "{method}@{label}" (another run of the
    same prompts with other settings, e.g. another kernel size)."""
    table = table if table is not None else {t: {} for t in tasks}
    # FullKV does not depend on the budget: a sweep runs it once, in whichever budget's directory
    # came first, so it is looked for in the other plain budget directories too (asked-for budgets
    # first); a suffixed one ({model}_512_kivi4, _whitened) holds another setting and is never used
    plain = re.compile(re.escape(model_name) + r"_((?:keep|compress)?[0-9.]+)$")
    others = sorted(m.group(1) for m in map(plain.match, os.listdir(results_root)) if m) \
        if os.path.isdir(results_root) else []
    for budget in list(budgets) + [b for b in others if b not in budgets]:
        for task in tasks:
            task_dir = os.path.join(results_root, f"{model_name}_{budget}", length, task)
            if not os.path.isdir(task_dir):
                continue
            for name in sorted(os.listdir(task_dir)):
                if not name.endswith(".json") or (budget not in budgets and name.lower() != "fullkv.json"):
                    continue
                leads: dict = {}
                scores = per_sample_scores(os.path.join(task_dir, name), task, num_samples, leads)
                if not scores:
                    continue
                method = name[:-5] + (f"@{label}" if label else "")
                key = "all" if method.lower() == "fullkv" else budget
                table[task].setdefault(method, {}).setdefault(key, dict(cell(scores), leads=leads))
    return table


def average_cell(cells: list) -> dict | None:
    """Mean over tasks; its standard error from the tasks' (independent samples): sqrt(sum se^2) / T."""
    if not cells or any(c is None for c in cells):
        return None
    return {"mean": sum(c["mean"] for c in cells) / len(cells),
            "se": math.sqrt(sum(c["se"] ** 2 for c in cells)) / len(cells), "n": min(c["n"] for c in cells)}


def show(c: dict | None, num_samples: int, se: bool = True, digits: int = 0) -> str:
    """One cell: score (± its standard error), and (n=k) when it holds fewer samples than asked for."""
    if c is None:
        return "-"
    text = f"{c['mean']:.{digits}f}" + (f" ± {c['se']:.0f}" if se else "")
    return text if c["n"] >= num_samples else f"{text} (n={c['n']})"


def ordered(methods, order: list) -> list:
    """The methods named in `order` first, in that order, then the others sorted."""
    return [m for m in order if m in methods] + sorted(set(methods) - set(order))


def at(cells: dict, budget):
    """A method's cell at a budget; FullKV's single run ("all") serves every budget."""
    return cells.get("all", cells.get(budget))


def task_average(table: dict, budgets: list) -> tuple[list, dict]:
    """(the tasks with cells, {method: {budget: average cell}}) over the methods of every such task;
    no averages for fewer than two tasks."""
    complete = [t for t in table if table[t]]
    if len(complete) < 2:
        return complete, {}
    methods = set.intersection(*(set(table[t]) for t in complete))
    return complete, {m: {b: average_cell([at(table[t][m], b) for t in complete]) for b in budgets}
                      for m in methods}


def markdown(title: str, per_method: dict, budgets: list, order: list, num_samples: int) -> str:
    methods = ordered(per_method, order)
    lines = [f"**{title}**", "", "| method | " + " | ".join(map(str, budgets)) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in methods:
        cells = per_method[method]
        row = [show(at(cells, b), num_samples) for b in budgets]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_tables(table: dict, budgets: list, order: list, num_samples: int, length: str) -> str:
    blocks = [markdown(f"{task}, {length} tokens", table[task], budgets, order, num_samples)
              for task in table if table[task]]
    complete, average = task_average(table, budgets)
    if average:
        blocks.append(markdown(f"average of {', '.join(complete)}", average, budgets, order, num_samples))
    note = (f"Cells: score ± standard error of the mean, from the samples with index < {num_samples}; "
            "(n=k) marks a cell with fewer samples. A cell of 0 ± 0 (or 100 ± 0) has no sample on the other side: "
            f"its 95% bound is about 300/n points away (rule of three; {300 / num_samples:.0f} at n={num_samples}). "
            "FullKV keeps every token: one run, in every column.")
    return "\n\n".join(blocks + [note]) + "\n"


def wide_tables(table: dict, budgets: list, order: list, num_samples: int) -> str:
    """The README's layout: scores only (no errors), two tasks side by side per table, then the
    average over all the tasks; a partial cell keeps its (n=k)."""
    complete, average = task_average(table, budgets)
    blocks = []
    for first in range(0, len(complete), 2):
        group = complete[first:first + 2]
        methods = ordered(set().union(*(table[t] for t in group)), order)
        header = " | ".join(f"{t}: {budgets[0]}" + "".join(f" | {b}" for b in budgets[1:]) for t in group)
        lines = [f"| method | {header} |", "|---|" + "---|" * (len(budgets) * len(group))]
        for m in methods:
            row = [show(at(table[t].get(m, {}), b), num_samples, se=False) for t in group for b in budgets]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        blocks.append("\n".join(lines))
    if average:
        lines = [f"| method ({len(complete)}-task average) | " + " | ".join(map(str, budgets)) + " |",
                 "|---|" + "---|" * len(budgets)]
        for m in ordered(average, order):
            row = [show(average[m][b], num_samples, se=False, digits=1) for b in budgets]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# UUID answers are binned at the ends of the UUID's hex groups (8-4-4-4-12 characters)
UUID_BINS = [(0, 0), (1, 7), (8, 12), (13, 17), (18, 22), (23, 35), (36, 36)]


def leading_digit_table(table: dict, budgets: list, order: list) -> str:
    """Per task, method and budget: how many answers reproduce exactly the first 0, 1, ... digits of
    a numeric needle value (the last column: the whole value before the answer's first "."), the
    needle diagnosis' measure; for UUID values, the leading characters reproduced, in bins that end
    where the UUID's groups end (the last: the whole UUID)."""
    blocks = []
    for task, per_method in table.items():
        leads = [v for m in per_method.values() for c in m.values() for v in c["leads"].values()]
        if not leads:  # no single-value needles of digits or a UUID (words, several values)
            continue
        if leads[0][0] == "uuid":
            bins, unit = UUID_BINS, "UUID characters"
        else:
            bins, unit = [(d, d) for d in range(max(n for _, n in leads) + 1)], "value digits"
        names = [str(lo) if lo == hi else f"{lo}–{hi}" for lo, hi in bins]
        lines = [f"**{task}: answers reproducing exactly the first {' / '.join(names)} {unit}**", "",
                 "| method | budget | " + " / ".join(names) + " |", "|---|---|---|"]
        for method in ordered(per_method, order):
            for key in (["all"] if "all" in per_method[method] else budgets):
                c = per_method[method].get(key)
                if c is None:
                    continue
                counts = [sum(1 for _, n in c["leads"].values() if lo <= n <= hi) for lo, hi in bins]
                lines.append(f"| {method} | {key} | " + " / ".join(map(str, counts)) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) on the discordant samples."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(table: dict, budgets: list, first: str, second: str) -> str:
    """Per task and budget, on the prompts both methods answered: how often each is right where the
    other is wrong (same prompts, so far more sensitive than comparing two cells' errors)."""
    lines = [f"**paired: {first} vs {second}** (prompts where only {first} / only {second} is right; "
             "exact two-sided sign test)", "", "| task | " + " | ".join(map(str, budgets)) + " |",
             "|---|" + "---|" * len(budgets)]
    for task, per_method in table.items():
        if first not in per_method or second not in per_method:
            continue
        row = []
        for budget in budgets:
            a = at(per_method[first], budget)
            b = at(per_method[second], budget)
            if a is None or b is None:
                row.append("-")
                continue
            common = set(a["by_index"]) & set(b["by_index"])
            wins = sum(a["by_index"][i] > b["by_index"][i] for i in common)
            losses = sum(a["by_index"][i] < b["by_index"][i] for i in common)
            row.append(f"{wins} / {losses}, p={sign_test_p(wins, losses):.2g}")
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_root", required=True, help="save dir holding {model_name}_{budget}/")
    parser.add_argument("--model_name", required=True, help="basename of the model path")
    parser.add_argument("--budgets", required=True, help="comma list of budget names as in the directory names")
    parser.add_argument("--tasks", required=True, help="comma list of RULER tasks")
    parser.add_argument("--num_samples", type=int, default=50, help="score samples with index < N (default: 50)")
    parser.add_argument("--length", default="4096", help="context length directory (default: 4096)")
    parser.add_argument("--methods", default="FullKV,SnapKV,PyramidKV,H2O,StreamingLLM,L2Norm,ChunkKV",
                        help="row order (comma list); others follow sorted (default: the issue-17 order)")
    parser.add_argument("--paired", default=None, action="append",
                        help="A,B: also count the prompts where only A or only B is right (repeatable)")
    parser.add_argument("--extra_root", default=None, action="append",
                        help="LABEL=DIR: also read DIR (another save dir of the same prompts); its methods "
                             "become METHOD@LABEL rows (repeatable)")
    parser.add_argument("--leading_digits", action="store_true",
                        help="also count, per cell, the answers reproducing exactly the first k digits of "
                             "a numeric needle, or the first k characters of a UUID needle (default: off)")
    parser.add_argument("--wide", action="store_true",
                        help="print scores only, two tasks side by side per table, then the average (the "
                             "README's layout; --paired and --leading_digits still follow)")
    parser.add_argument("--out", default="", help="also write the markdown here (default: print only)")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in metrics.RULER_TASK_TO_METRIC]
    if unknown or not tasks:
        print(f"error: unknown RULER task {','.join(unknown) or '(none given)'} "
              f"(valid: {', '.join(metrics.RULER_TASK_TO_METRIC)})", file=sys.stderr)
        return 2
    if args.num_samples < 1:
        print(f"error: --num_samples {args.num_samples} must be >= 1", file=sys.stderr)
        return 2
    pairs = [p.split(",") for p in args.paired or []]
    bad = [",".join(p) for p in pairs if len(p) != 2 or not all(p)]
    if bad:
        print(f"error: --paired {bad[0]!r} must name two methods: A,B (e.g. PyramidKV,SnapKV)", file=sys.stderr)
        return 2
    extra = [e.split("=", 1) for e in args.extra_root or []]
    bad = [e for e, p in zip(args.extra_root or [], extra) if len(p) != 2 or not all(p) or not os.path.isdir(p[1])]
    if bad:
        print(f"error: --extra_root {bad[0]!r} must be LABEL=DIR with an existing DIR", file=sys.stderr)
        return 2
    try:
        budgets = parse_budget_names(args.budgets)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = collect(args.results_root, args.model_name, budgets, tasks, args.length, args.num_samples)
    for label, root in extra:
        collect(root, args.model_name, budgets, tasks, args.length, args.num_samples, label, table)
    if not any(table.values()):
        print(f"error: no prediction files for {','.join(tasks)} under "
              f"{args.results_root}/{args.model_name}_<budget>/{args.length}/", file=sys.stderr)
        return 2
    order = [m for m in args.methods.split(",") if m]
    if args.wide:
        text = wide_tables(table, budgets, order, args.num_samples)
    else:
        text = build_tables(table, budgets, order, args.num_samples, args.length)
    text += "".join("\n" + paired(table, budgets, a, b) + "\n" for a, b in pairs)
    if args.leading_digits:
        text += "\n" + leading_digit_table(table, budgets, order) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
