"""scripts/diagnose_h2o.py on the embedded checkpoint: question and first-quarter shares per layer."""
import json

import pytest

from conftest import load_script


def run(tmp_path, budget):
    out = tmp_path / f"d{budget}.json"
    load_script("diagnose_h2o").main(["--model_path", "tiny", "--task", "niah_single_1", "--length", "512", "--n", "2",
                                         "--budget", str(budget), "--out", str(out), "--threads", "1"])
    return json.loads(out.read_text())


def test_budget_above_the_prompt_keeps_the_whole_question_and_a_quarter_early(tmp_path):
    report = run(tmp_path, 4096)
    assert report["accuracy"]["FullKV"] == 100.0
    for method in ("H2O", "SnapKV"):
        assert report["question_kept_share"][method] == pytest.approx([1.0, 1.0])
        assert all(0.2 < share <= 0.25 for share in report["first_quarter_share_of_kept"][method])
        assert report["accuracy"][method] == 100.0


def test_small_budget_shares_are_fractions_per_layer(tmp_path, capsys):
    report = run(tmp_path, 48)
    for key in ("question_kept_share", "first_quarter_share_of_kept"):
        for method in ("H2O", "SnapKV"):
            assert len(report[key][method]) == 2 and all(0 <= v <= 1 for v in report[key][method])
    # SnapKV's window votes come from the question's end: it keeps more of the question than H2O does
    assert sum(report["question_kept_share"]["SnapKV"]) > sum(report["question_kept_share"]["H2O"])
    assert "| mean |" in capsys.readouterr().out


def test_bad_numbers_are_one_line_errors():
    with pytest.raises(SystemExit, match="--budget 8 > 8"):
        load_script("diagnose_h2o").main(["--model_path", "tiny", "--budget", "8"])
