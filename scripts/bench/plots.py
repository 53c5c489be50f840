"""The efficiency benchmark's two figures, drawn from its records (a fresh run or a results JSON).

Reading rules kept here on purpose: token counts on the axes are plain numbers (64, 1k, 16k, k = 1024),
every magnitude axis (time, memory, bytes) starts at 0 so a 4% difference looks like 4%, every method
has its own marker and line style (lines that coincide are drawn once and labelled together), the
title names model, device, dtype and attention, and a method that was not run at every context
(H2O is capped by --method_max_context) says so in the legend and in a note under the figure.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from cli import PLOT_SUFFIXES

MB = 2**20
STYLES = {
    "FullKV": {"color": "black", "marker": "s", "linestyle": "--"},
    "DynamicCache": {"color": "0.5", "marker": "D", "linestyle": ":"},
    "SnapKV": {"color": "tab:blue", "marker": "o", "linestyle": "-"},
    "PyramidKV": {"color": "tab:red", "marker": "^", "linestyle": "-"},
    "H2O": {"color": "tab:purple", "marker": "v", "linestyle": "-."},
    "StreamingLLM": {"color": "tab:green", "marker": "P", "linestyle": (0, (5, 1.5))},
    "L2Norm": {"color": "tab:orange", "marker": "X", "linestyle": (0, (3, 1, 1, 1, 1, 1))},
}
_SPARE = [{"color": c, "marker": m, "linestyle": "-"} for c, m in
          (("tab:brown", "*"), ("tab:pink", "h"), ("tab:olive", "<"), ("tab:cyan", ">"))]


def style(method: str, index: int) -> dict:
    return STYLES.get(method) or _SPARE[index % len(_SPARE)]


def tokens_label(n: float) -> str:
    """64 -> '64', 1024 -> '1k', 16384 -> '16k', 1536 -> '1.5k' (k = 1024 tokens)."""
    n = int(n)
    if n < 1024:
        return str(n)
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n / 1024:.1f}k"


def title_of(model: str, settings: dict) -> str:
    return (f"{model} · {settings['device']} · {settings['dtype']} · attention {settings['attn_implementation']} · "
            f"{settings['threads']} threads · {settings['new_tokens']} new tokens")


def early_stops(records: list[dict], settings: dict) -> dict[str, int]:
    """{method: largest context it was run at} for methods that stop before the run's largest context."""
    largest = max(r["context"] for r in records)
    reached: dict[str, int] = {}
    for r in records:
        if r["budget"] is not None or r["method"] in ("FullKV", "DynamicCache"):
            reached[r["method"]] = max(reached.get(r["method"], 0), r["context"])
    return {m: c for m, c in reached.items() if c < largest}


def stop_note(stops: dict[str, int], settings: dict) -> str:
    limits = settings.get("method_max_context") or {}
    parts = []
    for method, context in stops.items():
        why = f" (--method_max_context {method}={limits[method]})" if method in limits else ""
        parts.append(f"{method} was run up to {tokens_label(context)} tokens only{why}.")
    return " ".join(parts)


def _token_axis(ax, values, label: str) -> None:
    import matplotlib.ticker as ticker

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(ticker.FixedLocator(sorted(set(values))))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: tokens_label(v)))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel(label)


def _from_zero(ax, top: float) -> None:
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)


def _finish(fig, title: str, note: str, width: float):
    """Wrapped title on top, wrapped note at the bottom, layout that leaves room for both."""
    title_lines = textwrap.wrap(title, int(width * 14))
    note_lines = textwrap.wrap(note, int(width * 15.5)) if note else []
    fig.suptitle("\n".join(title_lines), fontsize=9)
    if note_lines:
        fig.text(0.01, 0.01, "\n".join(note_lines), fontsize=7, va="bottom")
    height = fig.get_figheight()  # inches; a 7-9 pt line is about 0.13 inch
    fig.tight_layout(rect=(0, (0.08 + 0.13 * len(note_lines)) / height, 1, 1 - 0.04 * (len(title_lines) - 1)))
    return fig


def decode_vs_context(records: list[dict], settings: dict, model: str):
    """Time per output token vs context: one panel per budget; the uncompressed runs in every panel."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in records))
    budgets = sorted({r["budget"] for r in records if r["budget"] is not None}) or [None]
    stops = early_stops(records, settings)
    width = max(6.5, 5.2 * len(budgets))
    fig, axes = plt.subplots(1, len(budgets), figsize=(width, 4.8), squeeze=False, sharey=True)
    top = 0.0
    for ax, budget in zip(axes[0], budgets):
        for i, m in enumerate(methods):
            uncompressed = all(r["budget"] is None for r in records if r["method"] == m)
            pts = sorted((r["context"], r["tpot_ms"]) for r in records
                         if r["method"] == m and r["budget"] == (None if uncompressed else budget))
            if not pts:
                continue
            # a small sideways shift per method keeps overlapping error bars apart (x is log 2)
            shift = 2 ** (0.04 * (i - (len(methods) - 1) / 2))
            x = [c * shift for c, _ in pts]
            y = [t["median"] for _, t in pts]
            err = [[t["median"] - t["min"] for _, t in pts], [t["max"] - t["median"] for _, t in pts]]
            top = max(top, max(t["max"] for _, t in pts))
            label = m + (f" (to {tokens_label(stops[m])} only)" if m in stops else "")
            ax.errorbar(x, y, yerr=err, capsize=3, markersize=6, linewidth=1.4, label=label, **style(m, i))
        _token_axis(ax, [r["context"] for r in records], "prompt length (tokens; k = 1024)")
        ax.set_title("uncompressed runs only" if budget is None else f"budget {budget} tokens per layer and KV head",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    _from_zero(axes[0][0], top)
    runs = records[0]["tpot_ms"].get("n", "?")
    axes[0][0].set_ylabel(f"time per output token (ms)\nmedian of {runs} runs, bars min-max")
    note = ("FullKV (pyramidkv, preallocated) and DynamicCache (transformers' own cache) do not compress: the "
            "same runs appear in every panel; their points at a budget-long prompt are what decoding the kept "
            "tokens alone costs. Points are shifted sideways slightly so that error bars do not overlap. "
            + stop_note(stops, settings))
    return _finish(fig, f"Decode time per token vs prompt length — {title_of(model, settings)}", note, width)


def _merged_series(series: dict[str, list[tuple]]) -> list[tuple[list[str], list[tuple]]]:
    """Methods whose points are identical, grouped (drawn once, labelled together)."""
    groups: list[tuple[list[str], list[tuple]]] = []
    for method, pts in series.items():
        for names, other in groups:
            if other == pts:
                names.append(method)
                break
        else:
            groups.append(([method], pts))
    return groups


def memory_vs_budget(records: list[dict], settings: dict, model: str):
    """Peak memory and KV bytes after prefill vs budget, at the largest context with compressed runs."""
    import matplotlib.pyplot as plt

    compressed = [r for r in records if r["budget"] is not None]
    if not compressed:
        return None
    context = max(r["context"] for r in compressed)
    methods = list(dict.fromkeys(r["method"] for r in records))
    here = {m: sorted((r["budget"], r) for r in compressed if r["method"] == m and r["context"] == context)
            for m in methods}
    here = {m: pts for m, pts in here.items() if pts}
    missing = [m for m in methods if m not in here and m not in ("FullKV", "DynamicCache")]
    kind = records[0].get("memory_kind") or ""
    peak_label = ("peak CUDA memory allocated (MB, median)" if kind.startswith("cuda")
                  else "peak process memory, RSS (MB, median)")
    width = 11.0
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(width, 4.6))
    panels = ((ax1, peak_label, lambda r: r["peak_mem_mb"]["median"]),
              (ax2, "KV cache after prefill (MB)", lambda r: r["kv_bytes_prefill"] / MB))
    for ax, label, value in panels:
        top = 0.0
        series = {m: [(b, value(r)) for b, r in pts] for m, pts in here.items()}
        for names, pts in _merged_series(series):
            index = methods.index(names[0])
            ax.plot([b for b, _ in pts], [v for _, v in pts], markersize=7, linewidth=1.4,
                    label=" = ".join(names) + (" (identical)" if len(names) > 1 else ""), **style(names[0], index))
            top = max(top, max(v for _, v in pts))
        for m in ("FullKV", "DynamicCache"):
            full = next((r for r in records if r["method"] == m and r["context"] == context), None)
            if full:
                s = style(m, 0)
                ax.axhline(value(full), color=s["color"], linestyle=s["linestyle"], linewidth=1.2,
                           label=f"{m} at {tokens_label(context)} (no compression): {value(full):.1f} MB")
                top = max(top, value(full))
        _token_axis(ax, [b for pts in here.values() for b, _ in pts], "budget (max_capacity_prompt, tokens per layer and KV head)")
        _from_zero(ax, top)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        # peak memory: lines near the top, legend below them; KV bytes: between the compressed lines
        # (near 0) and the full cache's line (the top)
        ax.legend(fontsize=7, **({"loc": "lower right"} if ax is ax1 else {"loc": "upper left", "bbox_to_anchor": (0, 0.86)}))
    note = (f"All at a {tokens_label(context)}-token prompt ({context} tokens). Peak memory includes the process "
            "and model baseline, so compressed and full runs differ by the cache alone. ")
    stops = {m: c for m, c in early_stops(records, settings).items() if m in missing}
    note += stop_note(stops, settings)
    unexplained = [m for m in missing if m not in stops]
    if unexplained:
        note += f" {', '.join(unexplained)}: not run at {tokens_label(context)} tokens."
    return _finish(fig, f"Memory vs budget at {tokens_label(context)} tokens — {title_of(model, settings)}", note,
                   width)


def plot(records: list[dict], out_prefix: Path, settings: dict, model: str) -> list[Path]:
    """Both figures as <out_prefix>_decode_vs_context.png and <out_prefix>_memory_vs_budget.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for suffix, draw in zip(PLOT_SUFFIXES, (decode_vs_context, memory_vs_budget)):
        fig = draw(records, settings, model)
        if fig is None:
            continue
        path = Path(f"{out_prefix}{suffix}")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
