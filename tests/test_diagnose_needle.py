"""scripts/diagnose_needle.py on the embedded checkpoint: kept shares, vote ranks, answers."""
import json

from conftest import load_script


def test_diagnosis_report(tmp_path, capsys):
    script = load_script("diagnose_needle")
    out = tmp_path / "d.json"
    script.main(["--model_path", "tiny", "--task", "niah_single_1", "--length", "512", "--n", "2", "--budget", "48",
                 "--configs", "SnapKV:w8:k7,PyramidKV:w8:k7,ChunkKV:w8:c10", "--answers", "--out", str(out),
                 "--threads", "1"])
    report = json.loads(out.read_text())
    assert [row["layer"] for row in report["per_layer"]] == [0, 1]
    assert all(0 <= row["SnapKV:w8:k7"] <= 100 for row in report["per_layer"])
    assert len(report["per_value_token"]) >= 1
    assert set(report["answers"]) == {"FullKV", "SnapKV:w8:k7", "PyramidKV:w8:k7", "ChunkKV:w8:c10"}
    assert report["answers"]["FullKV"]["accuracy"] == 100.0  # the embedded model answers with a full cache
    assert sum(report["answers"]["SnapKV:w8:k7"]["leading_digits_histogram"].values()) == 2
    # PyramidKV selects with its own per-layer budgets (2 layers: more in layer 0 than SnapKV's 48)
    assert report["per_layer"][0]["PyramidKV:w8:k7"] >= report["per_layer"][0]["SnapKV:w8:k7"]
    assert "| config | accuracy % |" in capsys.readouterr().out


def test_bad_config_is_one_line_error():
    script = load_script("diagnose_needle")
    try:
        script.parse_config("SnapKV:x8")
    except ValueError as err:
        assert "use wN, kN, cN or fN" in str(err) and "\n" not in str(err)
    else:
        raise AssertionError("no error")


def test_floor_part_is_a_fraction():
    # AdaKV:w8:k7:f20 -> floor_fraction 0.2 (percent in the config text, a fraction for the method)
    assert load_script("diagnose_needle").parse_config("AdaKV:w8:k7:f20") == (
        "AdaKV", {"window_size": 8, "kernel_size": 7, "floor_fraction": 0.2})
