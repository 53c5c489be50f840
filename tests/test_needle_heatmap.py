"""scripts/needle_heatmap.py on synthetic run_ruler result files: per-sample string_match_all, depth
bins, per-method averages, PNGs, and one-line errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("needle_heatmap", os.path.join(ROOT, "scripts", "needle_heatmap.py"))
needle_heatmap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(needle_heatmap)

DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's grid (pyramidkv/ruler/niah.py)


def write_results(results_dir, task, method, lengths, found):
    """40 samples per length; sample i has its needle at DEPTHS[i]; found(length, depth) -> answered?"""
    for length in lengths:
        path = results_dir / str(length) / task / f"{method}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for i, depth in enumerate(DEPTHS):
                pred = " 1234567." if found(length, depth) else " 1234."
                f.write(json.dumps({"pred": pred, "outputs": ["1234567"], "length": length, "index": i,
                                    "depth": depth}) + "\n")


def test_heatmap_scores_bins_and_averages(tmp_path, capsys):
    res = tmp_path / "SmolLM2-135M-Instruct_128"
    write_results(res, "niah_single_2", "FullKV", [1024, 2048], lambda n, d: True)
    write_results(res, "niah_single_2", "SnapKV", [1024, 2048], lambda n, d: d < 50 or n == 1024)
    write_results(res, "niah_single_2", "H2O", [1024], lambda n, d: False)
    out = tmp_path / "fig"
    argv = [str(res), "--task", "niah_single_2", "--methods", "FullKV,SnapKV", "--out_dir", str(out)]
    assert needle_heatmap.main(argv) == 0
    table = (out / "needle_niah_single_2.md").read_text().splitlines()
    assert table[2] == "| method | 1024 | 2048 | average | samples |"
    below_half = sum(d < 50 for d in DEPTHS) / 40 * 100  # 20 of 40 depths are < 50 %
    assert table[4:] == ["| FullKV | 100.0 | 100.0 | 100.0 | 80 |",
                         f"| SnapKV | 100.0 | {below_half:.1f} | {(100 + below_half) / 2:.1f} | 80 |"]
    assert sorted(os.listdir(out)) == ["needle_niah_single_2.md", "needle_niah_single_2.png",
                                       "needle_niah_single_2_FullKV.png", "needle_niah_single_2_SnapKV.png"]
    assert (out / "needle_niah_single_2_SnapKV.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = needle_heatmap.collect([str(res)], "niah_single_2", ["SnapKV"])
    rows = needle_heatmap.grid(found["SnapKV"], [1024, 2048], 10)
    assert [r[1] for r in rows] == [100.0] * 5 + [0.0] * 5  # depth 0-50 % found at 2048, 50-100 % lost
    assert [r[0] for r in rows] == [100.0] * 10
    assert sum(needle_heatmap.depth_bin(d, 10) == 9 for d in DEPTHS) == 5  # 90, 92, 95, 97 and 100 %
    assert "H2O" in needle_heatmap.collect([str(res)], "niah_single_2", None)  # default: every method


def test_several_results_dirs_label_methods_by_budget(tmp_path):
    for budget in (128, 512):
        write_results(tmp_path / f"m_{budget}", "niah_single_1", "SnapKV", [1024], lambda n, d: budget == 512)
    for budget in (128, 512):  # FullKV run twice (separate runs per budget): each sample counts once
        write_results(tmp_path / f"m_{budget}", "niah_single_1", "FullKV", [1024], lambda n, d: True)
    found = needle_heatmap.collect([str(tmp_path / "m_128"), str(tmp_path / "m_512")], "niah_single_1",
                                   ["FullKV", "SnapKV"])
    assert list(found) == ["FullKV", "SnapKV @128", "SnapKV @512"]
    assert len(found["FullKV"][1024]) == 40 and len(found["SnapKV @512"][1024]) == 40
    assert needle_heatmap.main([str(tmp_path / "m_128"), str(tmp_path / "m_512"), "--task", "niah_single_1"]) == 0
    assert (tmp_path / "m_128" / "needle_niah_single_1_SnapKV_512.png").exists()


def test_bad_input_is_one_line_error(tmp_path, capsys):
    res = tmp_path / "m_64"
    write_results(res, "niah_single_2", "SnapKV", [1024], lambda n, d: True)
    cases = [([str(tmp_path / "nope")], "does not exist"),
             ([str(res), "--task", "niah_multikey_1"], "no " + str(res) + "/{length}/niah_multikey_1/ directory"),
             ([str(res), "--methods", "PyramidKV"], "no PyramidKV.json under"),
             ([str(res), "--depth_bins", "0"], "--depth_bins 0 must be between 1 and 40")]
    for argv, message in cases:
        assert needle_heatmap.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    path = res / "1024" / "niah_single_2" / "SnapKV.json"
    path.write_text(path.read_text() + '{"pred": "x"}\n')
    assert needle_heatmap.main([str(res)]) == 2
    assert "SnapKV.json:41: missing field(s) outputs, depth" in capsys.readouterr().err


def test_help():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "needle_heatmap.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--depth_bins" in proc.stdout and "results_dirs" in proc.stdout


@pytest.mark.parametrize("depth,row", [(0, 0), (9, 0), (10, 1), (97, 9), (100, 9)])
def test_depth_bin(depth, row):
    assert needle_heatmap.depth_bin(depth, 10) == row
