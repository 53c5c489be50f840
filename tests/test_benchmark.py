"""Smoke test of the efficiency benchmark CLI at tiny sizes (not a timing test: no number is checked
against a threshold, only that every measurement is produced, consistent and written out)."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_cli():
    return _load("pyramidkv_benchmark_cli", SCRIPTS / "benchmark.py")


def test_help_exits_cleanly(bench_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "--context_lengths" in capsys.readouterr().out


def test_bad_arguments_are_rejected(bench_cli, capsys):
    assert bench_cli.main(["--methods", "NoSuchMethod"]) == 2
    assert "unknown method 'NoSuchMethod'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own type check, also one line
        bench_cli.main(["--context_lengths", "12,abc"])
    assert exit_info.value.code == 2


def test_plan_adds_the_reference_and_skips_budgets_above_the_context():
    sys.path.insert(0, str(SCRIPTS / "bench"))
    measure = _load("pyramidkv_bench_measure", SCRIPTS / "bench" / "measure.py")
    configs = measure.plan(["FullKV", "SnapKV", "DynamicCache"], [64, 128], [32, 96], reference=True)
    assert ("FullKV", 32, None) in configs and ("DynamicCache", 96, None) in configs
    assert ("SnapKV", 64, 96) not in configs  # a budget >= the prompt compresses nothing
    assert ("SnapKV", 128, 96) in configs and ("SnapKV", 64, 32) in configs


def test_tiny_run_writes_json_csv_plots_and_targets(bench_cli, tmp_path, capsys):
    argv = ["--context_lengths", "96", "--max_capacity_prompts", "32", "--new_tokens", "3", "--repeats", "2",
            "--warmup", "1", "--methods", "FullKV,SnapKV,PyramidKV,StreamingLLM,DynamicCache",
            "--target_budget", "32", "--threads", "1", "--out_dir", str(tmp_path), "--tag", "smoke"]
    assert bench_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "TPOT ms" in out and "target 1" in out
    payload = json.loads((tmp_path / "smoke.json").read_text())
    records = {(r["method"], r["context"], r["budget"]): r for r in payload["records"]}
    # FullKV and DynamicCache at 96, FullKV and DynamicCache at a 32-token prompt (the reference), 3 compressed
    assert len(records) == 7
    snap = records[("SnapKV", 96, 32)]
    # 4 layers x 2 KV heads x head_dim 32 x (K and V) x 4 bytes per kept token
    assert snap["kv_bytes_prefill"] == snap["kv_bytes_formula"] == 32 * 4 * 2 * 32 * 2 * 4
    assert records[("PyramidKV", 96, 32)]["kv_bytes_exact"]
    assert records[("FullKV", 96, None)]["kv_bytes_prefill"] == 96 * 4 * 2 * 32 * 2 * 4
    for record in payload["records"]:
        assert record["tpot_ms"]["n"] == 2 and record["tpot_ms"]["min"] <= record["tpot_ms"]["median"]
        assert record["peak_mem_mb"]["median"] > 0 and record["kv_bytes_end"] >= record["kv_bytes_prefill"]
        assert record["deterministic"]
    assert snap["select_ms"]["median"] > 0
    assert {c["target"] for c in payload["targets"]} == {1, 2, 3, 4}
    with open(tmp_path / "smoke.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 7
    assert (tmp_path / "smoke_decode_vs_context.png").stat().st_size > 0
    assert (tmp_path / "smoke_memory_vs_budget.png").stat().st_size > 0
