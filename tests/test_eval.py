"""eval.py on hand-written prediction trees: LongBench, LongBench-E, RULER, malformed lines."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as lb_eval  # noqa: E402


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def lb_line(pred, answers, _id, length=100, classes=None):
    return {"pred": pred, "answers": answers, "all_classes": classes, "length": length, "_id": _id}


def test_longbench_scores_averages_and_bad_lines(tmp_path, capsys):
    write_lines(str(tmp_path / "hotpotqa" / "snapkv.json"), [
        lb_line("Paris", ["paris"], "a"),
        '{"pred": "broken',                          # malformed JSON: reported, skipped
        {"answers": ["x"], "length": 1, "_id": "b"},  # no pred: reported, skipped
        lb_line("Rome", ["paris"], "c"),
        lb_line("Paris", ["paris"], "c"),             # repeated id: counted once
    ])
    write_lines(str(tmp_path / "trec" / "snapkv.json"), [
        lb_line("Location\nNumber", ["Location"], "t1", classes=["Location", "Number"])])
    write_lines(str(tmp_path / "dureader" / "snapkv.json"), [lb_line("北京", ["北京"], "d1")])
    write_lines(str(tmp_path / "trec" / "FullKV.json"), [
        lb_line("Number", ["Location"], "t1", classes=["Location", "Number"])])
    os.makedirs(tmp_path / "not_a_dataset")
    assert lb_eval.main(["--results_dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "hotpotqa/snapkv.json:2: malformed JSON" in captured.err
    assert "hotpotqa/snapkv.json:3: missing pred" in captured.err
    assert "hotpotqa/snapkv.json:5: repeated _id 'c'" in captured.err
    assert "not_a_dataset: not a LongBench dataset directory" in captured.err
    results = json.load(open(tmp_path / "results.json"))
    # hotpotqa: samples a (1.0) and c (0.0) -> 50.0; trec first line "Location" -> 100; dureader 100
    assert results["snapkv"] == {"hotpotqa": 50.0, "trec": 100.0, "dureader": 100.0,
                                 "average_english": 75.0, "average": 83.33}
    assert results["FullKV"] == {"trec": 0.0, "average_english": 0.0, "average": 0.0}
    csv_lines = open(tmp_path / "results.csv").read().splitlines()
    assert csv_lines[0] == "method,hotpotqa,trec,dureader,average_english,average"
    assert csv_lines[1] == "FullKV,,0.0,,0.0,0.0"
    assert "snapkv" in captured.out and "83.33" in captured.out


def test_longbench_e_buckets(tmp_path):
    write_lines(str(tmp_path / "qasper_e" / "H2O.json"), [
        lb_line("yes", ["yes"], "1", length=1000), lb_line("no", ["yes"], "2", length=5000),
        lb_line("yes", ["yes"], "3", length=9000), lb_line("yes", ["yes"], "4", length=5001)])
    write_lines(str(tmp_path / "qasper" / "H2O.json"), [lb_line("no", ["yes"], "1")])  # not LongBench-E
    assert lb_eval.main(["--results_dir", str(tmp_path), "--longbench_e"]) == 0
    results = json.load(open(tmp_path / "results_e.json"))
    assert results == {"H2O": {"qasper": {"0-4k": 100.0, "4-8k": 50.0, "8k+": 100.0}}}
    assert not os.path.exists(tmp_path / "results.json")


def test_ruler_tree(tmp_path):
    def line(pred, outputs, index):
        return {"pred": pred, "outputs": outputs, "length": 4096, "index": index, "depth": 50}
    write_lines(str(tmp_path / "4096" / "niah_single_1" / "SnapKV.json"), [
        line("The number is 1234567.", ["1234567"], 0), line("none", ["7654321"], 1)])
    write_lines(str(tmp_path / "4096" / "qa_1" / "SnapKV.json"), [line("It is PARIS", ["Paris", "France"], 0)])
    write_lines(str(tmp_path / "8192" / "niah_multivalue" / "SnapKV.json"), [
        line("12 and 34", ["12", "34", "56", "78"], 0)])
    assert lb_eval.main(["--results_dir", str(tmp_path)]) == 0  # detected as RULER from the length dirs
    results = json.load(open(tmp_path / "results.json"))
    assert results == {"SnapKV": {"4096": {"niah_single_1": 50.0, "qa_1": 100.0, "average": 75.0},
                                  "8192": {"niah_multivalue": 50.0, "average": 50.0}}}
    csv_lines = open(tmp_path / "results.csv").read().splitlines()
    assert csv_lines[0] == "method,length,niah_single_1,niah_multivalue,qa_1,average"
    assert csv_lines[1:] == ["SnapKV,4096,50.0,,100.0,75.0", "SnapKV,8192,,50.0,,50.0"]


def test_missing_or_empty_results_dir(tmp_path, capsys):
    assert lb_eval.main(["--results_dir", str(tmp_path / "nope")]) == 2
    assert lb_eval.main(["--results_dir", str(tmp_path)]) == 2
    assert "no prediction files found" in capsys.readouterr().err
