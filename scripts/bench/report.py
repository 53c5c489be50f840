"""Tables, CSV/JSON and target checks for the efficiency benchmark (plots: plots.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

MB = 2**20


def _mmm(summary: dict, digits: int = 1) -> str:
    """'median [min-max]'."""
    if not summary or summary.get("median") is None:
        return "-"
    f = f"{{:.{digits}f}}"
    return f"{f.format(summary['median'])} [{f.format(summary['min'])}-{f.format(summary['max'])}]"


def _budget(record: dict) -> str:
    return "-" if record["budget"] is None else str(record["budget"])


COLUMNS = ("method", "context", "budget", "TTFT ms", "TPOT ms", "tok/s", "peak MB", "KV MB prefill",
           "KV MB end", "KV exact", "select ms", "select % prefill")


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        share = r["select_share_of_prefill"]
        rows.append([
            r["method"], str(r["context"]), _budget(r),
            _mmm(r["ttft_ms"], 1), _mmm(r["tpot_ms"], 2), _mmm(r["throughput_tok_s"], 1),
            _mmm(r["peak_mem_mb"], 0), f"{r['kv_bytes_prefill'] / MB:.3f}", f"{r['kv_bytes_end'] / MB:.3f}",
            "yes" if r["kv_bytes_exact"] else "NO",
            _mmm(r["select_ms"], 1) if r["method"] != "DynamicCache" else "-",
            f"{100 * share['median']:.2f}" if r["method"] != "DynamicCache" and share["median"] is not None else "-",
        ])
    return rows


def text_table(records: list[dict]) -> str:
    rows = [list(COLUMNS)] + table_rows(records)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return "\n".join(lines)


def write_csv(records: list[dict], path: Path) -> None:
    fields = ["method", "context", "budget"]
    metrics = ("ttft_ms", "tpot_ms", "throughput_tok_s", "peak_mem_mb", "peak_mem_above_base_mb", "select_ms",
               "select_share_of_prefill")
    for metric in metrics:
        fields += [f"{metric}_median", f"{metric}_min", f"{metric}_max"]
    fields += ["kv_bytes_prefill", "kv_bytes_end", "kv_bytes_expected", "kv_bytes_formula", "kv_bytes_exact",
               "repeats", "memory_kind"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for r in records:
            row = {"method": r["method"], "context": r["context"], "budget": r["budget"]}
            for metric in metrics:
                for stat in ("median", "min", "max"):
                    row[f"{metric}_{stat}"] = r[metric][stat]
            for key in ("kv_bytes_prefill", "kv_bytes_end", "kv_bytes_expected", "kv_bytes_formula",
                        "kv_bytes_exact", "memory_kind"):
                row[key] = r[key]
            row["repeats"] = r["tpot_ms"]["n"]
            writer.writerow(row)


def write_json(payload: dict, path: Path) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1)


# ---- targets ------------------------------------------------------------------------------------
def _find(records, method, context, budget):
    for r in records:
        if r["method"] == method and r["context"] == context and r["budget"] == budget:
            return r
    return None


def check_targets(records: list[dict], budget: int) -> list[dict]:
    """The issue's four targets at the largest context and `budget`, per compressed method (medians)."""
    contexts = [r["context"] for r in records if r["budget"] is not None]
    if not contexts:
        return []
    context = max(contexts)
    full = _find(records, "FullKV", context, None)
    references = [r for r in (_find(records, m, budget, None) for m in ("FullKV", "DynamicCache")) if r]
    checks = []
    for r in records:
        if r["context"] != context or r["budget"] != budget:
            continue
        m, tpot = r["method"], r["tpot_ms"]["median"]
        for baseline in (full, _find(records, "DynamicCache", context, None)):
            if baseline:
                ratio = baseline["tpot_ms"]["median"] / tpot
                checks.append({"target": 1, "method": m, "value": ratio, "goal": ">= 6", "met": ratio >= 6,
                               "what": f"{baseline['method']} TPOT / {m} TPOT at {context} (budget {budget})"})
        for reference in references:
            ratio = tpot / reference["tpot_ms"]["median"]
            checks.append({"target": 2, "method": m, "value": ratio, "goal": "<= 1.15", "met": ratio <= 1.15,
                           "what": f"{m} TPOT at {context} / {reference['method']} TPOT at a {budget}-token prompt"})
        share = r["select_share_of_prefill"]["median"]
        checks.append({"target": 3, "method": m, "value": share, "goal": "<= 0.02", "met": share <= 0.02,
                       "what": f"{m} selection+gather / prefill at {context}"})
        uniform = r["kv_bytes_expected"] == r["kv_bytes_formula"]
        exact = r["kv_bytes_prefill"] == r["kv_bytes_expected"]
        lower = full is not None and r["peak_mem_mb"]["median"] < full["peak_mem_mb"]["median"]
        formula = ("budget x layers x KV heads x head_dim x 2 x dtype" if uniform else
                   "the sum of its per-layer budgets (not uniform, so the issue's formula does not apply)")
        detail = (f"KV after prefill {r['kv_bytes_prefill']} B vs {formula} = {r['kv_bytes_expected']} B; "
                  f"peak {r['peak_mem_mb']['median']:.0f} MB vs FullKV "
                  f"{full['peak_mem_mb']['median']:.0f} MB" if full else "no FullKV run")
        checks.append({"target": 4, "method": m, "value": detail, "goal": "exact bytes and lower peak",
                       "met": exact and lower, "what": f"{m} KV bytes + peak memory at {context}"})
    return checks


def targets_text(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        value = c["value"] if isinstance(c["value"], str) else f"{c['value']:.4g}"
        lines.append(f"target {c['target']} [{'MET' if c['met'] else 'NOT MET'}] {c['what']}: {value} "
                     f"(goal {c['goal']})")
    return "\n".join(lines)
