"""scripts/kv_bytes_report.py: the bytes each method holds after prefill, for a model's KV shape."""
import json

from conftest import load_script


def test_bytes_follow_the_budget_rule_of_each_method(tmp_path):
    out = tmp_path / "bytes.json"
    assert load_script("kv_bytes_report").main(["--shape", "tiny", "--length", "200", "--methods",
                                                "FullKV,SnapKV,SimCalKV,PyramidInfer", "--keep_ratios", "0.25,0.5",
                                                "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["method"], r.get("keep_ratio")): r["nbytes"] for r in report["rows"]}
    per_token = 2 * 2 * 32 * 2 * 4  # layers x KV heads x head_dim x (K, V) x fp32
    assert rows[("FullKV", None)] == 200 * per_token
    assert rows[("SnapKV", 0.5)] == 100 * per_token and rows[("SnapKV", 0.25)] == 50 * per_token
    # SimCalKV keeps the same slots plus one fp32 logit bias per slot and KV head
    assert rows[("SimCalKV", 0.5)] == 100 * per_token + 2 * 2 * 100 * 4
    # PyramidInfer's layer l removes 0.01 * l more: layer 1 of 2 keeps fewer than SnapKV
    assert rows[("PyramidInfer", 0.5)] < rows[("SnapKV", 0.5)]


def test_bad_length_is_a_one_line_error(capsys):
    assert load_script("kv_bytes_report").main(["--length", "4"]) == 2
    assert "--length 4 must be at least 16" in capsys.readouterr().err


def test_bad_budget_is_a_one_line_error(capsys):
    assert load_script("kv_bytes_report").main(["--keep_ratios", "0.1,x"]) == 2
    assert "bad budget list" in capsys.readouterr().err
