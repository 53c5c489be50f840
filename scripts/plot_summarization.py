"""ROUGE vs compress_ratio per method from run_summarization.py output dirs: a markdown table and a plot.

    python scripts/plot_summarization.py results_summarization/* --plot rouge_vs_ratio.png --table table.md

Every directory's summary.json gives one point (kv_method, compress_ratio, ROUGE after); the full-cache
ROUGE (metrics_before) is drawn as a horizontal line — the mean over the directories, which differ only
if they ran on different samples or models (a warning then names them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROUGES = ("rouge1", "rouge2", "rougeL")


def load_points(directories: list[str]) -> list[dict]:
    points = []
    for directory in directories:
        path = os.path.join(directory, "summary.json")
        if not os.path.isfile(path):
            print(f"warning: {path} not found, skipped", file=sys.stderr)
            continue
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        config = summary["config"]
        points.append({"dir": directory, "method": config["kv_method"], "ratio": config["compress_ratio"],
                       "model": config.get("model_name"), "samples": summary["num_samples"],
                       "before": summary["metrics_before"], "after": summary["metrics_after"],
                       "memory_before": summary["memory_before_MB"], "memory_after": summary["memory_after_MB"]})
    if not points:
        raise SystemExit("error: no summary.json in the given directories")
    return points


def markdown_table(points: list[dict]) -> str:
    full = {r: statistics.fmean(p["before"][r] for p in points) for r in ROUGES}
    lines = ["| method | compress_ratio | ROUGE-1 | ROUGE-2 | ROUGE-L | K/V MB (full -> compressed) |",
             "|---|---|---|---|---|---|",
             f"| full cache | 0 | {full['rouge1']:.2f} | {full['rouge2']:.2f} | {full['rougeL']:.2f} | |"]
    for p in sorted(points, key=lambda p: (p["method"], p["ratio"])):
        a = p["after"]
        lines.append(f"| {p['method']} | {p['ratio']:g} | {a['rouge1']:.2f} | {a['rouge2']:.2f} | "
                     f"{a['rougeL']:.2f} | {p['memory_before']:.2f} -> {p['memory_after']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: str, rouge: str = "rougeL") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({p["method"] for p in points}):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["ratio"])
        ax.plot([p["ratio"] for p in mine], [p["after"][rouge] for p in mine], marker="o", label=method)
    ax.axhline(statistics.fmean(p["before"][rouge] for p in points), color="black", linestyle="--",
               label="full cache")
    models = sorted({str(p["model"]) for p in points})
    ax.set(xlabel="compress_ratio (fraction of the prompt's K/V removed)", ylabel=f"{rouge} F1 x 100",
           title=f"{rouge} vs compress_ratio ({', '.join(models)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run_summarization.py output directories")
    parser.add_argument("--plot", default=None, help="PNG path for the ROUGE-L vs ratio plot")
    parser.add_argument("--table", default=None, help="markdown table path (default: print it)")
    args = parser.parse_args(argv)
    points = load_points(args.dirs)
    befores = {json.dumps(p["before"], sort_keys=True) for p in points}
    if len(befores) > 1:
        print(f"warning: the full-cache ROUGE differs between directories ({len(befores)} values): they "
              "ran on different samples, models or settings", file=sys.stderr)
    table = markdown_table(points)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(table)
    else:
        print(table, end="")
    if args.plot:
        plot(points, args.plot)


if __name__ == "__main__":
    main()
