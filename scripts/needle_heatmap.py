r"""Needle-in-a-haystack heatmaps (the figure of the SnapKV and PyramidKV papers) from run_ruler.py output.

    python run_ruler.py --method FullKV,SnapKV,PyramidKV,StreamingLLM --max_capacity_prompts 128 \
        --tasks niah_single_2 --num_samples 40 --context_lengths 1024,2048,4096,8192
    python scripts/needle_heatmap.py results_ruler/SmolLM2-135M-Instruct_128 --task niah_single_2

Reads {results_dir}/{length}/{task}/{Method}.json (one JSON line per sample with "pred", "outputs" and
"depth", the needle's depth in % of the haystack), scores each sample with RULER's string_match_all
(the % of its answers found in the prediction) and draws one heatmap per method: x = context length,
y = needle depth (0 % = start of the haystack, at the top, as in the papers), colour = mean score of
the samples in that cell, red (0) to green (100). RULER's niah samples put each needle on a 40-point depth
grid (pyramidkv/ruler/niah.py DEPTHS), every 40 consecutive samples on each point once (with the
default spread order any first n samples reach over the whole context); the depths are binned into
--depth_bins rows (10 samples per length: one sample per 10% row). Writes {out_dir}/needle_{task}_{label}.png per method, one
needle_{task}.png with every method side by side, and needle_{task}.md (per-method averages per
length and overall); prints the markdown. Several results dirs may be given (e.g. one per budget):
methods are then labelled with their directory's budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

# red -> yellow -> green, as in the papers' needle figures (0 = needle lost, 100 = always found)
COLOURS = ("#d7301f", "#f4c430", "#1a9850")


class HeatmapError(ValueError):
    """A one-line, user-facing problem (missing file, malformed line, ...)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dirs", nargs="+",
                        help="run_ruler.py results dirs ({save_dir}/{model}_{budget}) holding {length}/{task}/")
    parser.add_argument("--task", default="niah_single_2", help="RULER task to plot (default: niah_single_2)")
    parser.add_argument("--methods", default=None,
                        help="comma list of methods, in panel order (default: every {Method}.json found, FullKV first, "
                             "the rest sorted)")
    parser.add_argument("--depth_bins", type=int, default=10, help="rows of the heatmap (default: 10)")
    parser.add_argument("--out_dir", default=None, help="where PNGs and the .md go (default: the first results dir)")
    return parser


def budget_of(results_dir: str) -> str | None:
    """'128' for .../SmolLM2-135M-Instruct_128 (run_ruler's {model}_{budget} naming), else None."""
    match = re.search(r"_(\d+)$", os.path.basename(os.path.normpath(results_dir)))
    return match.group(1) if match else None


def read_samples(path: str) -> list[dict]:
    """The samples of one results file; one-line errors naming file:line for bad lines."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if not line.endswith("\n"):  # a run killed mid-write; run_ruler recomputes it on resume
                    continue
                raise HeatmapError(f"{path}:{number}: malformed JSON line") from None
            missing = [k for k in ("pred", "outputs", "depth") if k not in record]
            if missing:
                raise HeatmapError(f"{path}:{number}: missing field(s) {', '.join(missing)} "
                                   "(written by an older run_ruler.py? rerun it)")
            samples.append(record)
    return samples


def sample_score(pred: str, outputs: list[str]) -> float:
    """RULER's string_match_all for one sample: % of the answers found in the prediction (any case)."""
    pred = pred.lower()
    return 100.0 * sum(1 for o in outputs if o.lower() in pred) / len(outputs)


def collect(results_dirs: list[str], task: str, methods: list[str] | None) -> dict:
    """{label: {length: [(depth, score), ...]}} for every method found (or asked for)."""
    found: dict = {}
    indices: dict = {}  # (label, length) -> sample indices already counted
    for results_dir in results_dirs:
        if not os.path.isdir(results_dir):
            raise HeatmapError(f"results dir {results_dir} does not exist")
        lengths = sorted((int(n) for n in os.listdir(results_dir) if n.isdigit()
                          and os.path.isdir(os.path.join(results_dir, n, task))))
        if not lengths:
            raise HeatmapError(f"no {results_dir}/{{length}}/{task}/ directory: run run_ruler.py --tasks {task} "
                               f"--save_dir {os.path.dirname(os.path.normpath(results_dir)) or '.'} first")
        # several dirs: a method is labelled with its dir's budget (or name), FullKV keeps its bare name
        tag = (budget_of(results_dir) and f"@{budget_of(results_dir)}") or f"({os.path.basename(results_dir)})"
        tag = tag if len(results_dirs) > 1 else None
        for length in lengths:
            task_dir = os.path.join(results_dir, str(length), task)
            for name in sorted(os.listdir(task_dir)):
                method = name[:-5]
                if not name.endswith(".json") or (methods and method not in methods):
                    continue
                label = method if tag is None or method == "FullKV" else f"{method} {tag}"
                # FullKV (budget-free) may sit in several dirs: each sample index counts once
                seen = indices.setdefault((label, length), set())
                fresh = [s for s in read_samples(os.path.join(task_dir, name))
                         if s["depth"] is not None and s.get("index", id(s)) not in seen]
                seen.update(s.get("index", id(s)) for s in fresh)
                found.setdefault(label, {}).setdefault(length, []).extend(
                    (s["depth"], sample_score(s["pred"], s["outputs"])) for s in fresh)
    for method in methods or []:
        if not any(label.split(" ")[0] == method for label in found):
            raise HeatmapError(f"no {method}.json under {', '.join(results_dirs)} for task {task}; "
                               f"found: {', '.join(sorted(found)) or 'none'}")
    if not found:
        raise HeatmapError(f"no {{Method}}.json files for task {task} under {', '.join(results_dirs)}")
    order = {m: i for i, m in enumerate(methods or ["FullKV"])}  # default: FullKV first, the rest sorted
    return {k: found[k] for k in sorted(found, key=lambda k: (order.get(k.split(" ")[0], len(order)), k))}


def depth_bin(depth: float, bins: int) -> int:
    return min(bins - 1, int(depth * bins / 100))  # depth 100 belongs to the last row


def grid(per_length: dict, lengths: list[int], bins: int) -> list[list[float]]:
    """[depth bin][length] mean score (NaN where no sample fell)."""
    sums = [[0.0] * len(lengths) for _ in range(bins)]
    counts = [[0] * len(lengths) for _ in range(bins)]
    for col, length in enumerate(lengths):
        for depth, score in per_length.get(length, []):
            row = depth_bin(depth, bins)
            sums[row][col] += score
            counts[row][col] += 1
    return [[s / c if c else math.nan for s, c in zip(srow, crow)] for srow, crow in zip(sums, counts)]


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def markdown(found: dict, lengths: list[int], task: str) -> str:
    lines = [f"Needle in a haystack, RULER {task}: mean string_match_all (%) per context length",
             "", "| method | " + " | ".join(f"{n}" for n in lengths) + " | average | samples |",
             "|---|" + "---|" * (len(lengths) + 2)]
    for label, per_length in found.items():
        cells = [mean(s for _, s in per_length.get(n, [])) for n in lengths]
        every = [s for n in lengths for _, s in per_length.get(n, [])]
        shown = ["-" if c is None else f"{c:.1f}" for c in cells]
        lines.append(f"| {label} | " + " | ".join(shown) + f" | {mean(every):.1f} | {len(every)} |")
    return "\n".join(lines)


def draw(ax, values, lengths: list[int], bins: int, title: str, cmap, depth_labels: bool = True):
    import numpy as np
    image = ax.imshow(np.array(values), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    edges = [round(100 * i / bins) for i in range(bins + 1)]
    ax.set_yticks(range(bins), [f"{edges[i]}-{edges[i + 1]}" for i in range(bins)] if depth_labels else [])
    ax.set_xlabel("context length (tokens)")
    if depth_labels:  # side-by-side panels share the leftmost panel's depth axis
        ax.set_ylabel("needle depth (%)")
    ax.set_title(title)
    for row in range(bins):
        for col in range(len(lengths)):
            if not math.isnan(values[row][col]):
                ax.text(col, row, f"{values[row][col]:.0f}", ha="center", va="center", fontsize=7)
    return image


def plot(found: dict, lengths: list[int], bins: int, task: str, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("needle", COLOURS).with_extremes(bad="#d9d9d9")  # grey: no sample
    written = []
    grids = {label: grid(per_length, lengths, bins) for label, per_length in found.items()}
    averages = {label: mean(s for runs in per_length.values() for _, s in runs) for label, per_length in found.items()}
    width = 1.1 + 0.9 * len(lengths)
    for label, values in grids.items():
        fig, ax = plt.subplots(figsize=(width + 1.2, 4.6))
        image = draw(ax, values, lengths, bins, f"{label} ({task}): average {averages[label]:.1f}", cmap)
        fig.colorbar(image, ax=ax, label="score (%)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"needle_{task}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, len(grids), figsize=(width * len(grids) + 1.2, 4.6), squeeze=False)
    for i, (ax, (label, values)) in enumerate(zip(axes[0], grids.items())):
        image = draw(ax, values, lengths, bins, f"{label}: {averages[label]:.1f}", cmap, depth_labels=i == 0)
    fig.colorbar(image, ax=list(axes[0]), label="score (%)")
    fig.suptitle(f"Needle in a haystack (RULER {task}): score by context length and needle depth")
    path = os.path.join(out_dir, f"needle_{task}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return written + [path]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.depth_bins < 1 or args.depth_bins > 40:
            raise HeatmapError(f"--depth_bins {args.depth_bins} must be between 1 and 40 (RULER's depth grid)")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        found = collect(args.results_dirs, args.task, methods)
        lengths = sorted({n for per_length in found.values() for n in per_length})
        out_dir = args.out_dir or args.results_dirs[0]
        os.makedirs(out_dir, exist_ok=True)
        table = markdown(found, lengths, args.task)
        md_path = os.path.join(out_dir, f"needle_{args.task}.md")
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(table + "\n")
        written = plot(found, lengths, args.depth_bins, args.task, out_dir)
    except (HeatmapError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {md_path} and {len(written)} PNGs: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
