"""run_ppl.py --compare_all's outputs: CS3602's table (every method at each cache size against the full-cache
baseline, with its change columns) and its four figures — method comparison, PPL–throughput trade-off,
method × metric heatmap of the changes, cache efficiency (PPL against the KV bytes held)."""

from __future__ import annotations

import os

CHANGE_COLUMNS = ("throughput change", "TPOT gain", "PPL change", "accuracy change")


def changes(result: dict, base: dict) -> list[float | None]:
    """The change columns in percent: throughput and TPOT (positive = faster), PPL and accuracy (vs baseline)."""
    return [100 * (result["throughput_tok_s"] / base["throughput_tok_s"] - 1),
            100 * (1 - result["tpot_s"] / base["tpot_s"]),
            100 * (result["perplexity"] / base["perplexity"] - 1),
            100 * (result["accuracy"] / base["accuracy"] - 1) if base["accuracy"] else None]


def _rows(results: dict[str, dict], size: int) -> list[tuple[str, dict]]:
    return [(label, r) for label, r in results.items() if r.get("cache_size") == size]


def comparison_table(results: dict[str, dict], sizes: list[int]) -> str:
    """CS3602's tables: per cache size, every method against the baseline, then the change columns."""
    base = results.get("baseline")
    lines = []
    for size in sizes:
        lines += [f"\n### cache size {size}\n", "| method | TTFT (s) | TPOT (s) | throughput (tok/s) | PPL | accuracy "
                  "| KV cache tokens | " + " | ".join(CHANGE_COLUMNS) + " |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, r in ([("baseline", base)] if base else []) + _rows(results, size):
            change = ["", "", "", ""]
            if base and r is not base:
                change = ["" if c is None else f"{c:+.1f}%" for c in changes(r, base)]
            lines.append(f"| {label} | {r['ttft_s']:.4f} | {r['tpot_s']:.4f} | {r['throughput_tok_s']:.2f} | "
                         f"{r['perplexity']:.2f} | {100 * r['accuracy']:.2f}% | {r['kv_cache_tokens']} | "
                         + " | ".join(change) + " |")
    return "\n".join(lines)


def draw_figures(results: dict[str, dict], sizes: list[int], out_dir: str) -> list[str]:
    """The four PNGs in out_dir; returns their paths. Needs the baseline run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    base = results["baseline"]
    methods = sorted({r["method"] for r in results.values() if r.get("method")})
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    def by_method(size):
        return {r["method"]: r for _, r in _rows(results, size)}

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods)), 4))  # 1. method comparison (PPL)
    width = 0.8 / max(1, len(sizes))
    for i, size in enumerate(sizes):
        runs = by_method(size)
        ax.bar(np.arange(len(methods)) + i * width, [runs[m]["perplexity"] if m in runs else np.nan for m in methods],
               width, label=f"cache {size}")
    ax.axhline(base["perplexity"], color="k", linestyle="--", label=f"full cache {base['perplexity']:.2f}")
    ax.set_xticks(np.arange(len(methods)) + width * (len(sizes) - 1) / 2, methods, rotation=40, ha="right")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity per method")
    ax.legend()
    save(fig, "method_comparison.png")

    def ppl_scatter(x_of, xlabel, title, name):  # 2. and 4.: perplexity against one cost per run
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for size, marker in zip(sizes, "os^Dv"):
            runs = by_method(size)
            ax.scatter([x_of(r) for r in runs.values()], [r["perplexity"] for r in runs.values()],
                       marker=marker, label=f"cache {size}")
            for m, r in runs.items():
                ax.annotate(m, (x_of(r), r["perplexity"]), fontsize=7)
        ax.scatter([x_of(base)], [base["perplexity"]], color="k", marker="*", s=120, label="full cache")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.legend()
        save(fig, name)

    ppl_scatter(lambda r: r["throughput_tok_s"], "throughput (tokens/s)", "Perplexity vs throughput",
                "ppl_vs_throughput.png")

    labels = [f"{m} {size}" for size in sizes for m in methods if m in by_method(size)]  # 3. heatmap
    grid = np.array([[np.nan if c is None else c for c in changes(by_method(size)[m], base)]
                     for size in sizes for m in methods if m in by_method(size)])
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.5))
    better = grid * np.array([1, 1, -1, 1])  # colour by benefit: a PPL increase is a loss
    limit = np.nanmax(np.abs(better)) if np.isfinite(better).any() else 1.0
    image = ax.imshow(better, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(CHANGE_COLUMNS)), CHANGE_COLUMNS, rotation=20)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for (row, col), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(col, row, f"{value:+.1f}%", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="benefit vs the full cache (%; green = better, PPL sign flipped)")
    ax.set_title("Change vs the full cache")
    save(fig, "method_metric_heatmap.png")

    ppl_scatter(lambda r: r["kv_cache_bytes"] / 2**20, "KV cache held at the end (MiB)", "Cache efficiency",
                "cache_efficiency.png")
    return paths
