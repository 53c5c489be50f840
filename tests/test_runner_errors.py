"""Bad runs fail before anything loads or is written, in one line (issue 16 items 4, 9, 10, "Also")."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import eval as eval_cli
import run_longbench
import run_ruler
from pyramidkv import longbench as lb
from pyramidkv import predict, results_dir
from pyramidkv.ruler import __main__ as ruler_cli
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNERS = {"ruler": run_ruler.main, "longbench": run_longbench.main}

_single_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


@pytest.fixture
def no_model(monkeypatch):
    def load(args):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(predict, "load_model_and_tokenizer", load)


def argv_for(runner, model, save, *extra):
    common = ["--model_path", str(model), "--save_dir", str(save), "--max_capacity_prompts", "64"]
    if runner == "ruler":
        return common + ["--context_lengths", "1024", "--tasks", "niah_single_1", "--num_samples", "1", *extra]
    return common + ["--datasets", "trec", "--data_dir", lb.SMOKE_DATA_DIR, "--max_num_examples", "1", *extra]


def one_line_error(runner, argv, capsys):
    capsys.readouterr()
    assert predict.run_cli(RUNNERS[runner], argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def tree(directory):
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(directory) for f in files} | {r: None for r, _, _ in os.walk(directory)}


@pytest.mark.parametrize("runner", RUNNERS)
def test_bad_config_creates_nothing_and_leaves_run_meta(runner, checkpoint, tmp_path, no_model, capsys):
    out = tmp_path / "res" / "tiny-llama_64"
    out.mkdir(parents=True)
    (out / "run_meta.json").write_text('{"FullKV": {"settings": {}}}')
    before = tree(tmp_path)
    cases = [(["--max_capacity_prompts", "0"], "max_capacity_prompt=0"),
             (["--max_capacity_prompts", "-5"], "max_capacity_prompt=-5"),
             (["--method", "SnapKV", "--window_size", "0"], "window_size=0"),
             (["--method", "SnapKV", "--window_size", "64"], "window"),
             (["--method", "SnapKV", "--kernel_size", "4"], "kernel_size"),
             (["--method", "SnapKV", "--sink_size", "4"], "unknown config"),
             (["--method", "nope"], "unknown method 'nope'"),
             (["--num_threads", "0"], "--num_threads 0 must be at least 1"),
             (["--eval_batch_size", "0"], "--eval_batch_size 0 must be at least 1")]
    if importlib.util.find_spec("flash_attn") is None:
        cases.append((["--attn_implementation", "flash_attention_2"], "needs the flash-attn package"))
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "torch sees no CUDA device"))
    for extra, message in cases:
        err = one_line_error(runner, argv_for(runner, checkpoint, tmp_path / "res", *extra), capsys)
        assert message in err
    assert tree(tmp_path) == before  # no tiny-llama_0/ or _-5/ dirs, run_meta.json byte for byte


@pytest.mark.parametrize("runner", RUNNERS)
def test_model_path_that_is_not_a_model(runner, tmp_path, no_model, capsys):
    model = tmp_path / "m"
    model.mkdir()
    cases = [({}, "is not a model (no config.json)"),
             ({"config.json": "{oops"}, "config.json is not readable JSON"),
             ({"config.json": "{}"}, "names no model_type"),
             ({"config.json": '{"model_type": "llama"}'}, "no weight files"),
             ({"model.safetensors": "w"}, "has no tokenizer")]
    for files, message in cases:
        for name, text in files.items():
            (model / name).write_text(text)
        assert message in one_line_error(runner, argv_for(runner, model, tmp_path / "res"), capsys)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("runner", RUNNERS)
def test_save_dir_under_a_file_or_read_only(runner, checkpoint, tmp_path, no_model, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    err = one_line_error(runner, argv_for(runner, checkpoint, tmp_path / "afile" / "res"), capsys)
    assert f"--save_dir {tmp_path / 'afile' / 'res'}: {tmp_path / 'afile' / 'res' / 'tiny-llama_64'} is under " \
           f"{tmp_path / 'afile'}, which is a file, not a directory" in err
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "tiny-llama_64").write_text("x")  # the results directory itself is a file
    err = one_line_error(runner, argv_for(runner, checkpoint, tmp_path / "res"), capsys)
    assert f"{tmp_path / 'res' / 'tiny-llama_64'} is a file, not a directory" in err

    class ReadOnly:
        f_flag = os.ST_RDONLY
    monkeypatch.setattr(results_dir.os, "statvfs", lambda path: ReadOnly())
    err = one_line_error(runner, argv_for(runner, checkpoint, tmp_path / "ro"), capsys)
    assert f"{tmp_path} is on a read-only filesystem" in err and not (tmp_path / "ro").exists()


@pytest.mark.parametrize("runner", RUNNERS)
def test_corrupt_run_meta_and_directory_in_place_of_a_results_file(runner, checkpoint, tmp_path, no_model, capsys):
    out = tmp_path / "tiny-llama_64"
    out.mkdir()
    (out / "run_meta.json").write_text('{"SnapKV": ')
    err = one_line_error(runner, argv_for(runner, checkpoint, tmp_path), capsys)
    assert f"{out / 'run_meta.json'} is not readable JSON" in err
    (out / "run_meta.json").unlink()
    results = out / ("1024/niah_single_1" if runner == "ruler" else "trec") / "FullKV.json"
    results.mkdir(parents=True)
    assert f"results file {results} is a directory" in one_line_error(runner, argv_for(runner, checkpoint, tmp_path),
                                                                      capsys)


def test_longbench_data_not_utf8_or_empty(checkpoint, tmp_path, no_model, capsys):
    data = tmp_path / "data"
    data.mkdir()
    good = open(lb.data_file(lb.SMOKE_DATA_DIR, "trec"), "rb").readline()
    (data / "trec.jsonl").write_bytes(good + b'{"input": "\xff\xfe"}\n')
    argv = argv_for("longbench", checkpoint, tmp_path / "res", "--data_dir", str(data))
    assert f"{data / 'trec.jsonl'}:2: not UTF-8 text (byte 0xff" in one_line_error("longbench", argv, capsys)
    (data / "trec.jsonl").write_text("\n")
    assert f"LongBench file {data / 'trec.jsonl'} has no samples" in one_line_error("longbench", argv, capsys)
    (data / "trec.jsonl").unlink()
    (data / "trec.jsonl").mkdir()
    assert "is a directory, not a jsonl file" in one_line_error("longbench", argv, capsys)
    assert not (tmp_path / "res").exists()


def test_ruler_pregenerated_data_checked_before_loading(checkpoint, tmp_path, no_model, capsys):
    data = tmp_path / "data"
    assert ruler_cli.main(["--tokenizer", checkpoint, "--tasks", "niah_single_1", "--context_lengths", "1024",
                           "--num_samples", "1", "--data_dir", str(data)]) == 0
    path = data / "1024" / "niah_single_1.jsonl"
    argv = argv_for("ruler", checkpoint, tmp_path / "res", "--data_dir", str(data))
    (data / "1024" / "niah_single_1.meta.json").write_text("{")
    assert "niah_single_1.meta.json is not readable JSON" in one_line_error("ruler", argv, capsys)
    path.write_bytes(path.read_bytes() + b"\x80\n")
    assert f"{path}:2: not UTF-8 text (byte 0x80 at column 1)" in one_line_error("ruler", argv, capsys)
    assert not (tmp_path / "res").exists()


def test_ruler_qa_file_checked_before_loading(checkpoint, tmp_path, no_model, capsys):
    (tmp_path / "squad.json").write_bytes(b'{"data": [\n"\xe9t\xe9"]}')
    argv = argv_for("ruler", checkpoint, tmp_path / "res", "--qa_dir", str(tmp_path)) + ["--tasks", "qa_1"]
    assert f"{tmp_path / 'squad.json'}:2: not UTF-8 text (byte 0xe9)" in one_line_error("ruler", argv, capsys)
    assert not (tmp_path / "res").exists()


def test_ruler_cli_tokenizer_that_is_not_a_tokenizer(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text('{"model_type": "llama"}')
    for spec, message in [(tmp_path, "is not a model (no config.json)"),
                          (tmp_path / "weights", "is not a tokenizer"),
                          (tmp_path / "weights" / "config.json", "is not a .gguf file"),
                          (tmp_path / "nope", "not found")]:
        assert ruler_cli.main(["--tokenizer", str(spec), "--data_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert ruler_cli.build_parser().get_default("tokenizer") == "smollm2"  # the runners' default model


def test_runner_defaults_and_every_flag_documents_its_default():
    assert run_ruler.build_parser().get_default("save_dir") == "results_ruler"
    assert run_longbench.build_parser().get_default("save_dir") == "results_long_bench"
    for parser in (run_ruler.build_parser(), run_longbench.build_parser(), ruler_cli.build_parser(),
                   eval_cli.build_parser()):
        for action in parser._actions:
            if action.dest != "help" and not action.required:
                assert "default" in (action.help or ""), (parser.prog, action.option_strings)


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, contextlib, io\n"
            "import run_ruler, run_longbench, eval\n"
            "from pyramidkv.ruler import __main__ as ruler_cli\n"
            "for main in (run_ruler.main, run_longbench.main, eval.main, ruler_cli.main):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- eval.py -------------------------------------------------------------------------------------
def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"".join(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode() for line in lines))


def lb_line(pred, _id):
    return {"pred": pred, "answers": ["Location"], "all_classes": ["Location"], "length": 9, "_id": _id}


def test_eval_bad_lines_directories_and_corrupt_run_meta(tmp_path, capsys):
    write(str(tmp_path / "trec" / "SnapKV.json"), [lb_line("Location", "a"), b'{"pred": "\xff"}\n', lb_line("x", "b")])
    (tmp_path / "trec" / "H2O.json").mkdir()
    (tmp_path / "run_meta.json").write_text("{")
    assert eval_cli.main(["--results_dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "trec/SnapKV.json:2: not UTF-8 text (byte 0xff at column 11); line skipped" in err
    assert "trec/H2O.json: a directory, not a prediction file; skipped" in err
    assert "run_meta.json is not readable JSON" in err
    assert json.loads((tmp_path / "results.json").read_text())["SnapKV"]["trec"] == 50.0
    assert eval_cli.main(["--results_dir", str(tmp_path / "trec" / "SnapKV.json")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_eval_read_only_results_dir_prints_the_table_then_warns(tmp_path, monkeypatch, capsys):
    write(str(tmp_path / "trec" / "SnapKV.json"), [lb_line("Location", "a")])
    real_open = open

    def read_only_open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(30, "Read-only file system", path)
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(eval_cli, "open", read_only_open, raising=False)
    assert eval_cli.main(["--results_dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "SnapKV" in captured.out and "100.00" in captured.out
    warning = [line for line in captured.err.splitlines() if "could not write" in line]
    assert warning == [f"warning: could not write {tmp_path / 'results'}.json/.csv (Read-only file system); "
                       "the table above is not saved"]


def test_eval_refuses_a_tree_mixing_longbench_and_ruler(tmp_path, capsys):
    write(str(tmp_path / "trec" / "SnapKV.json"), [lb_line("Location", "a")])
    write(str(tmp_path / "1024" / "niah_single_1" / "SnapKV.json"),
          [{"pred": "1234", "outputs": ["1234"], "index": 0, "length": 1000}])
    assert eval_cli.main(["--results_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixes RULER results (1024/) and LongBench results (trec/)" in err and "\n" not in err
    assert not (tmp_path / "results.json").exists()
    assert eval_cli.main(["--results_dir", str(tmp_path), "--benchmark", "ruler"]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "SnapKV": {"1024": {"niah_single_1": 100.0, "average": 100.0}}}
