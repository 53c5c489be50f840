"""scripts/scripts_ruler/sample_table.py: per-cell scores with sample counts and binomial errors."""
import json
import math
import os

from conftest import load_script

sample_table = load_script("scripts_ruler/sample_table")


def write(path, records, extra_lines=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def rec(index, right):
    return {"pred": " 1234567." if right else " 1234.", "outputs": ["1234567"], "index": index}


def table_text(tmp_path, budgets, tasks, *flags):
    """sample_table's markdown for the tree under tmp_path (4 samples per cell)."""
    out = tmp_path / "t.md"
    assert sample_table.main(["--results_root", str(tmp_path), "--model_name", "m", "--budgets", budgets,
                              "--tasks", tasks, "--num_samples", "4", "--out", str(out), *flags]) == 0
    return out.read_text()


def make_tree(root):
    base = os.path.join(root, "m_{}", "4096", "niah_single_1", "{}.json")
    # FullKV once (budget 64's directory): 3 right of 4; index 4 is past --num_samples 4
    write(base.format(64, "FullKV"), [rec(0, 1), rec(1, 1), rec(2, 0), rec(3, 1), rec(4, 0)])
    # SnapKV 64: index 1 repeated (counted once) and a malformed line (skipped); 1 right of 2 samples
    write(base.format(64, "SnapKV"), [rec(0, 1), rec(1, 0), rec(1, 1)], ["{not json"])
    write(base.format(128, "SnapKV"), [rec(i, 1) for i in range(4)])


def test_scores_counts_and_errors(tmp_path, capsys):
    make_tree(str(tmp_path))
    out = tmp_path / "t.md"
    assert sample_table.main(["--results_root", str(tmp_path), "--model_name", "m", "--budgets", "64,128",
                              "--tasks", "niah_single_1", "--num_samples", "4", "--out", str(out)]) == 0
    text = out.read_text()
    se_full = round(100 * math.sqrt(0.75 * 0.25 / 4))  # 22
    assert f"| FullKV | 75 ± {se_full} | 75 ± {se_full} |" in text
    assert "| SnapKV | 50 ± 35 (n=2) | 100 ± 0 |" in text
    assert "malformed JSON" in capsys.readouterr().err


def test_average_over_tasks(tmp_path):
    make_tree(str(tmp_path))
    write(os.path.join(str(tmp_path), "m_128", "4096", "niah_single_2", "SnapKV.json"),
          [rec(0, 0), rec(1, 0), rec(2, 1), rec(3, 1)])
    table = sample_table.collect(str(tmp_path), "m", ["128"], ["niah_single_1", "niah_single_2"], "4096", 4)
    avg = sample_table.average_cell([table["niah_single_1"]["SnapKV"]["128"], table["niah_single_2"]["SnapKV"]["128"]])
    assert avg["mean"] == 75 and avg["n"] == 4
    assert math.isclose(avg["se"], math.sqrt(0 + 25.0 ** 2) / 2)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    assert sample_table.main(["--results_root", str(tmp_path), "--model_name", "m", "--budgets", "64",
                              "--tasks", "niah_single_9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "niah_single_9" in err and "niah_single_1" in err and "\n" not in err
    assert sample_table.main(["--results_root", str(tmp_path), "--model_name", "m", "--budgets", "64",
                              "--tasks", "niah_single_1"]) == 2
    assert "no prediction files" in capsys.readouterr().err


def test_paired_counts_only_discordant_prompts(tmp_path):
    make_tree(str(tmp_path))
    out = tmp_path / "t.md"
    # budget 128: SnapKV right on 0-3, FullKV right on 0, 1, 3 -> only SnapKV right once (index 2)
    assert sample_table.main(["--results_root", str(tmp_path), "--model_name", "m", "--budgets", "64,128",
                              "--tasks", "niah_single_1", "--num_samples", "4", "--out", str(out),
                              "--paired", "FullKV,SnapKV"]) == 0
    text = out.read_text()
    # budget 64: SnapKV has indices 0 (right) and 1 (wrong, its first line); FullKV right on both
    assert "| niah_single_1 | 1 / 0, p=1 | 0 / 1, p=1 |" in text
    assert sample_table.sign_test_p(0, 0) == 1.0
    assert math.isclose(sample_table.sign_test_p(0, 11), 2 / 2 ** 11)
    assert math.isclose(sample_table.sign_test_p(7, 3), 2 * sum(math.comb(10, k) for k in range(4)) / 2 ** 10)


def test_bad_paired_is_one_line_error(tmp_path, capsys):
    assert sample_table.main(["--results_root", str(tmp_path), "--model_name", "m", "--budgets", "64",
                              "--tasks", "niah_single_1", "--paired", "SnapKV"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'SnapKV'" in err and "A,B" in err and "\n" not in err


def test_extra_root_rows_pair_with_the_main_root(tmp_path, capsys):
    make_tree(str(tmp_path / "main"))
    write(str(tmp_path / "k15" / "m_128" / "4096" / "niah_single_1" / "SnapKV.json"),
          [rec(0, 0), rec(1, 1), rec(2, 1), rec(3, 1)])
    out = tmp_path / "t.md"
    assert sample_table.main(["--results_root", str(tmp_path / "main"), "--model_name", "m", "--budgets", "128",
                              "--tasks", "niah_single_1", "--num_samples", "4", "--out", str(out),
                              "--extra_root", f"k15={tmp_path / 'k15'}", "--paired", "SnapKV@k15,SnapKV"]) == 0
    text = out.read_text()
    assert "| SnapKV@k15 | 75 ± 22 |" in text and "| SnapKV | 100 ± 0 |" in text
    assert "| niah_single_1 | 0 / 1, p=1 |" in text
    assert "| FullKV | 75 ± 22 |" in text  # found in budget 64's directory though only 128 was asked for
    assert sample_table.main(["--results_root", str(tmp_path / "main"), "--model_name", "m", "--budgets", "128",
                              "--tasks", "niah_single_1", "--extra_root", "k15"]) == 2
    assert "LABEL=DIR" in capsys.readouterr().err


def test_leading_digits_histogram(tmp_path):
    make_tree(str(tmp_path))
    text = table_text(tmp_path, "64,128", "niah_single_1", "--leading_digits")
    # wrong answers are " 1234." (the first 4 of 1234567), right ones the whole value
    assert "| FullKV | all | 0 / 0 / 0 / 0 / 1 / 0 / 0 / 3 |" in text
    assert "| SnapKV | 64 | 0 / 0 / 0 / 0 / 1 / 0 / 0 / 1 |" in text


def test_leading_digits_metric():
    from pyramidkv import metrics
    assert metrics.leading_digits(" 1585.", "1585744") == 4
    assert metrics.leading_digits("The number is 1585744.", "1585744") == 7
    assert metrics.leading_digits(" 9585744.", "1585744") == 0
    assert metrics.leading_digits("no number", "1585744") == 0


def test_leading_uuid_characters(tmp_path):
    from pyramidkv import metrics
    uuid = "d14d112e-a120-480d-afdc-2dbc5ea405b8"
    assert metrics.leading_uuid_chars(f' the "{uuid}" which', uuid) == 36
    assert metrics.leading_uuid_chars(' the "d14d112e-a120-480d-9111-000000000000"', uuid) == 19
    assert metrics.leading_uuid_chars(' "d14d112e2222222"', uuid) == 8
    # a hex-letter word before the answer is not taken for it; no UUID-like run at all is 0
    assert metrics.leading_uuid_chars(' it added "d14d0000"', uuid) == 4
    assert metrics.leading_uuid_chars(' the "chivalrous-spokeswoman" uuid', uuid) == 0
    base = os.path.join(str(tmp_path), "m_{}", "4096", "niah_single_3", "{}.json")
    preds = [f' "{uuid}"', ' "d14d112e-a120-480d-9111-0000"', ' "d14d1"', " none"]
    write(base.format(64, "FullKV"), [{"pred": p, "outputs": [uuid], "index": i} for i, p in enumerate(preds)])
    text = table_text(tmp_path, "64", "niah_single_3", "--leading_digits")
    assert "0 / 1–7 / 8–12 / 13–17 / 18–22 / 23–35 / 36 UUID characters" in text
    assert "| FullKV | all | 1 / 1 / 0 / 0 / 1 / 0 / 1 |" in text


def test_fullkv_of_another_setting_is_not_used(tmp_path):
    write(str(tmp_path / "m_128" / "4096" / "niah_single_1" / "SnapKV.json"), [rec(0, 1)])
    write(str(tmp_path / "m_512_kivi4" / "4096" / "niah_single_1" / "FullKV.json"), [rec(0, 0)])
    table = sample_table.collect(str(tmp_path), "m", ["128"], ["niah_single_1"], "4096", 4)
    assert set(table["niah_single_1"]) == {"SnapKV"}


def test_wide_layout(tmp_path):
    make_tree(str(tmp_path))
    base = os.path.join(str(tmp_path), "m_{}", "4096", "niah_single_2", "{}.json")
    write(base.format(64, "FullKV"), [rec(i, 1) for i in range(4)])
    write(base.format(64, "SnapKV"), [rec(i, i < 1) for i in range(4)])
    write(base.format(128, "SnapKV"), [rec(i, i < 3) for i in range(4)])
    text = table_text(tmp_path, "64,128", "niah_single_1,niah_single_2", "--wide")
    assert "| method | niah_single_1: 64 | 128 | niah_single_2: 64 | 128 |" in text
    # SnapKV 64 holds 2 of the 4 samples of niah_single_1 (1 right): its cell keeps the count
    assert "| SnapKV | 50 (n=2) | 100 | 25 | 75 |" in text
    assert "| FullKV | 75 | 75 | 100 | 100 |" in text
    assert "| SnapKV | 37.5 (n=2) | 87.5 |" in text  # the 2-task average
