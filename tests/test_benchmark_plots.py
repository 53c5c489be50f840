"""The benchmark's figures, drawn from the committed results JSON: plain token labels, magnitude axes
from 0, one marker and line style per method, a full title, and a note where a method stops early."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "cpu_tiny_sdpa.json"  # H2O capped at 4k by --method_max_context

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
sys.path.insert(0, str(REPO / "scripts" / "bench"))
import plots  # noqa: E402


@pytest.fixture(scope="module")
def payload():
    return json.loads(RESULTS.read_text())


def lines_of(ax):
    """(label, marker, linestyle) of every labelled data line (error-bar containers unwrapped)."""
    handles, labels = ax.get_legend_handles_labels()
    out = []
    for handle, label in zip(handles, labels):
        line = handle[0] if isinstance(handle, tuple) else handle  # an ErrorbarContainer is a tuple
        out.append((label, line.get_marker(), str(line.get_linestyle())))
    return out


def test_decode_figure_is_readable(payload):
    fig = plots.decode_vs_context(payload["records"], payload["settings"], payload["model"])
    title = fig._suptitle.get_text().replace("\n", " ")
    for part in ("tiny (random weights)", "cpu", "float32", "sdpa"):
        assert part in title
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["64", "256", "1k", "4k", "16k"]  # not 2^6 ... 2^14
        assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
        drawn = lines_of(ax)
        assert len({(marker, style) for _, marker, style in drawn}) == len(drawn)  # every method its own look
        assert "H2O (to 4k only)" in [label for label, _, _ in drawn]
    notes = " ".join(t.get_text().replace("\n", " ") for t in fig.texts)
    assert "H2O was run up to 4k tokens only (--method_max_context H2O=4096)" in notes


def test_memory_figure_starts_at_zero_and_merges_identical_lines(payload):
    fig = plots.memory_vs_budget(payload["records"], payload["settings"], payload["model"])
    peak, kv = fig.axes
    assert peak.get_ylim()[0] == 0 and kv.get_ylim()[0] == 0  # 577 vs 604 MB must not look like a cliff
    assert [t.get_text() for t in peak.get_xticklabels()] == ["64", "256", "1k"]
    labels = [label for label, _, _ in lines_of(kv)]
    assert "SnapKV = PyramidKV = StreamingLLM (identical)" in labels  # the same bytes: drawn once, said once
    assert "16k" in fig._suptitle.get_text()


def test_replot_redraws_the_committed_json(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--replot", str(RESULTS),
                          "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for suffix in ("_decode_vs_context.png", "_memory_vs_budget.png"):
        assert (tmp_path / f"cpu_tiny_sdpa{suffix}").stat().st_size > 10_000
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--replot", str(RESULTS),
                            "--out_dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
