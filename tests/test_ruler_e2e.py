"""RULER end to end: tiny model, 2 tasks, 2 methods -> prediction tree -> eval.py results.json."""
import json
import os
import sys
import pytest

import eval as eval_cli
import run_ruler
from pyramidkv import predict
from pyramidkv.ruler import __main__ as ruler_cli
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = "niah_single_1,vt"

_single_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _run(checkpoint, save_dir, method, *extra):
    argv = ["--method", method, "--model_path", checkpoint, "--save_dir", str(save_dir),
            "--context_lengths", "1024", "--tasks", TASKS, "--num_samples", "2",
            "--max_capacity_prompts", "64", "--attn_implementation", "sdpa", *extra]
    assert predict.run_cli(run_ruler.main, argv) == 0


def test_two_methods_tree_and_scores(checkpoint, tmp_path):
    for method in ("FullKV", "SnapKV"):
        _run(checkpoint, tmp_path, method, "--eval_batch_size", "2")  # left-padded batch of both samples
    results_dir = tmp_path / "tiny-llama_64"
    for task in TASKS.split(","):
        for method in ("FullKV", "SnapKV"):
            records = _lines(results_dir / "1024" / task / f"{method}.json")
            assert [r["index"] for r in records] == [0, 1]
            assert all(set(r) == {"pred", "outputs", "length", "index", "depth"} for r in records)
            assert all(0.95 * 1024 <= r["length"] <= 1024 for r in records)
    # rerun: finished indices are skipped, nothing is appended
    _run(checkpoint, tmp_path, "SnapKV")
    assert len(_lines(results_dir / "1024" / "vt" / "SnapKV.json")) == 2
    meta = json.loads((results_dir / "run_meta.json").read_text())
    assert meta["SnapKV"]["protocol"]["benchmark"] == "RULER"
    assert meta["SnapKV"]["protocol"]["data_sources"]["1024/vt"] == "generated on the fly"
    assert meta["SnapKV"]["settings"]["depth_order"] == "spread"  # part of the resume setting

    assert eval_cli.main(["--results_dir", str(results_dir)]) == 0
    results = json.loads((results_dir / "results.json").read_text())
    assert set(results) == {"FullKV", "SnapKV"}
    for per_length in results.values():
        scores = per_length["1024"]
        assert set(scores) == {"niah_single_1", "vt", "average"}
        assert scores["average"] == pytest.approx((scores["niah_single_1"] + scores["vt"]) / 2, abs=0.01)


def test_oracle_predictions_score_100(checkpoint, tmp_path, monkeypatch):
    """A 'model' that reads the needle out of the prompt it is given scores 100 on niah and 0 on vt:
    prompts, answers and indices stay aligned from generation to scoring."""
    def oracle(model, tokenizer, prompts, max_new_tokens, method, config, stop_strings=None):
        return [p.split("is: ")[-1].split(".")[0] if "special magic" in p else "no idea" for p in prompts]

    monkeypatch.setattr(run_ruler.predict, "generate", oracle)
    _run(checkpoint, tmp_path, "FullKV", "--eval_batch_size", "2")
    results_dir = tmp_path / "tiny-llama_64"
    assert eval_cli.main(["--results_dir", str(results_dir)]) == 0
    scores = json.loads((results_dir / "results.json").read_text())["FullKV"]["1024"]
    assert scores == {"niah_single_1": 100.0, "vt": 0.0, "average": 50.0}


def test_pregenerated_data_is_used(checkpoint, tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "data"
    assert ruler_cli.main(["--tokenizer", checkpoint, "--tasks", "niah_single_1", "--context_lengths", "1024",
                           "--num_samples", "2", "--data_dir", str(data_dir)]) == 0
    path = data_dir / "1024" / "niah_single_1.jsonl"
    samples = _lines(path)
    assert [s["index"] for s in samples] == [0, 1]
    assert json.loads((data_dir / "1024" / "niah_single_1.meta.json").read_text())["num_samples"] == 2
    seen = []
    monkeypatch.setattr(run_ruler.predict, "generate",
                        lambda model, tok, prompts, *a, **k: seen.extend(prompts) or ["x"] * len(prompts))
    argv = ["--model_path", checkpoint, "--save_dir", str(tmp_path / "out"), "--context_lengths", "1024",
            "--tasks", "niah_single_1", "--num_samples", "2", "--data_dir", str(data_dir)]
    assert predict.run_cli(run_ruler.main, argv) == 0
    assert seen == [s["input"] for s in samples]
    assert json.loads((data_dir / "1024" / "niah_single_1.meta.json").read_text())["depth_order"] == "spread"
    other = argv + ["--depth_order", "sequential", "--save_dir", str(tmp_path / "out2")]
    capsys.readouterr()
    assert predict.run_cli(run_ruler.main, other) == 2  # the file's needles are not where the run says
    err = capsys.readouterr().err.strip()
    assert "was generated with --depth_order spread, this run has --depth_order sequential" in err
    assert "\n" not in err and not (tmp_path / "out2").exists()
    path.write_text(path.read_text().replace('"index": 1', '"index": 1,,'))
    with pytest.raises(ValueError, match=r"niah_single_1.jsonl:2: malformed JSON line"):
        run_ruler.sample_getter(run_ruler.build_parser().parse_args(argv), None, "niah_single_1", 1024, False)


def test_bad_input_is_one_line_error(checkpoint, tmp_path, capsys):
    base = ["--model_path", checkpoint, "--save_dir", str(tmp_path)]
    assert predict.run_cli(run_ruler.main, base + ["--tasks", "niah_single_9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown RULER task 'niah_single_9'") and "\n" not in err
    assert predict.run_cli(run_ruler.main, base + ["--tasks", "qa_1", "--qa_dir", str(tmp_path)]) == 2
    assert "squad.json" in capsys.readouterr().err
    assert predict.run_cli(run_ruler.main, base + ["--context_lengths", "4k"]) == 2
    assert "bad context length list '4k'" in capsys.readouterr().err


def test_cli_help(capsys):
    for main in (run_ruler.main, ruler_cli.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0 and "--context_lengths" in capsys.readouterr().out


def test_sweep_table_methods_by_budgets(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts", "scripts_ruler"))
    import sweep_table

    runs = {64: {"FullKV": 90.0, "SnapKV": 40.0}, 128: {"SnapKV": 70.0, "StreamingLLM": 10.0}}
    for budget, methods in runs.items():
        directory = tmp_path / f"tiny_{budget}"
        directory.mkdir()
        results = {m: {"1024": {"niah_single_1": avg, "average": avg}} for m, avg in methods.items()}
        (directory / "results.json").write_text(json.dumps(results))
    assert sweep_table.main(["--results_root", str(tmp_path), "--model_name", "tiny", "--budgets", "64,128",
                             "--methods", "FullKV,SnapKV,StreamingLLM"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["1024", "tokens", "budget", "64", "budget", "128"]
    assert lines[1].split() == ["FullKV*", "90.00", "90.00"]  # budget-independent: one run, every column
    assert lines[2].split() == ["SnapKV", "40.00", "70.00"]
    assert lines[3].split() == ["StreamingLLM", "-", "10.00"]
    assert (tmp_path / "sweep_tiny.csv").read_text().splitlines()[0] == "length,method,64,128"
    per_task = (tmp_path / "sweep_tiny.md").read_text().splitlines()
    assert per_task[2] == "| method | budget | niah_single_1 | average |"
    assert per_task[4:] == ["| FullKV | all | 90.0 | 90.0 |", "| SnapKV | 64 | 40.0 | 40.0 |",
                            "| SnapKV | 128 | 70.0 | 70.0 |", "| StreamingLLM | 128 | 10.0 | 10.0 |"]


def test_sweep_table_takes_ratio_and_quantized_budget_names(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts", "scripts_ruler"))
    import sweep_table

    for budget, avg in {"keep0.1": 20.0, "keep0.5": 60.0, "512_kivi4": 80.0}.items():
        directory = tmp_path / f"tiny_{budget}"
        directory.mkdir()
        (directory / "results.json").write_text(json.dumps({"SnapKV": {"1024": {"niah_single_1": avg,
                                                                                "average": avg}}}))
    assert sweep_table.main(["--results_root", str(tmp_path), "--model_name", "tiny",
                             "--budgets", "keep0.1,keep0.5,512_kivi4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["1024", "tokens", "budget", "keep0.1", "budget", "keep0.5", "budget", "512_kivi4"]
    assert lines[1].split() == ["SnapKV", "20.00", "60.00", "80.00"]
    assert sweep_table.main(["--results_root", str(tmp_path), "--model_name", "tiny", "--budgets", "../x"]) == 2
    assert "bad --budgets entry '../x'" in capsys.readouterr().err


def test_a_sweep_predicts_what_one_run_per_method_and_budget_does(tmp_path):
    """--method A,B --max_capacity_prompts x,y: one shared prefill per prompt, the same files as separate
    runs (on the embedded checkpoint, whose answers depend on what is kept), FullKV once, resumable."""
    base = ["--model_path", "tiny", "--context_lengths", "512", "--tasks", "niah_single_1,niah_multikey_1",
            "--num_samples", "3", "--window_size", "4"]
    methods, budgets = ["FullKV", "snapkv", "PyramidKV", "StreamingLLM"], ["24", "64"]
    for method in methods:
        for budget in budgets:
            if method == "FullKV" and budget != budgets[0]:
                continue
            argv = base + ["--method", method, "--max_capacity_prompts", budget, "--save_dir", str(tmp_path / "one")]
            assert predict.run_cli(run_ruler.main, argv) == 0
    # a sweep killed after one sample of the first task resumes where it stopped
    partial = base + ["--method", ",".join(methods), "--max_capacity_prompts", ",".join(budgets),
                      "--save_dir", str(tmp_path / "sweep"), "--eval_batch_size", "2"]
    assert predict.run_cli(run_ruler.main, partial[:partial.index("--num_samples") + 1] + ["1"]
                           + partial[partial.index("--num_samples") + 2:]) == 0
    assert predict.run_cli(run_ruler.main, partial) == 0
    one, sweep = tmp_path / "one", tmp_path / "sweep"
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*.json") if p.name != "run_meta.json")
    assert files == sorted(str(p.relative_to(sweep)) for p in sweep.rglob("*.json") if p.name != "run_meta.json")
    assert "pyramidkv-tiny-llama_64/512/niah_single_1/FullKV.json" not in files  # FullKV runs once
    preds = set()
    for name in files:
        expected = sorted(_lines(one / name), key=lambda r: r["index"])
        got = sorted(_lines(sweep / name), key=lambda r: r["index"])
        assert got == expected, name
        preds.add(tuple(r["pred"] for r in got))
    assert len(preds) > 3  # methods and budgets really answer differently
