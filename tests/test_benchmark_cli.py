"""The efficiency benchmark's command line: where results go, one-line errors before any model is
built, a --help that imports nothing heavy and documents every default."""

import hashlib
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"
# the smallest real run: two configurations, one prefill + one decode step each
TINY_RUN = ["--context_lengths", "48", "--max_capacity_prompts", "16", "--methods", "FullKV,SnapKV",
            "--new_tokens", "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no_reference",
            "--no_plots", "--tag", "clitest"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pyramidkv_benchmark_cli_errors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts scripts/bench on sys.path
    return module


@pytest.fixture
def no_model(bench, monkeypatch):
    """Any attempt to build or load a model fails the test: checks must come first."""
    common = importlib.import_module("common")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(common, "build_model", refuse)


def exit_code(bench, argv) -> int:
    try:
        return bench.main(argv)
    except SystemExit as stop:  # argparse's own errors exit
        return stop.code


def committed_results() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((REPO / "benchmarks").iterdir()) if p.is_file()}


BAD = [
    (["--window_size", "64", "--max_capacity_prompts", "32"], "--max_capacity_prompts 32 is invalid"),
    (["--window_size", "32", "--max_capacity_prompts", "32,64"], "--max_capacity_prompts 32 is invalid"),
    (["--window_size", "0"], "--window_size 0 is invalid"),
    (["--window_size", "-4"], "--window_size -4 is invalid"),
    (["--kernel_size", "0"], "--kernel_size 0 is invalid"),
    (["--context_lengths", "0"], "--context_lengths"),
    (["--context_lengths", "1024,-5"], "--context_lengths"),
    (["--context_lengths", "8"], "--context_lengths 8 is invalid"),
    (["--repeats", "0"], "--repeats 0 is invalid"),
    (["--warmup", "-1"], "--warmup -1 is invalid"),
    (["--new_tokens", "1"], "--new_tokens 1 is invalid"),
    (["--threads", "0"], "--threads 0 is invalid"),
    (["--target_budget", "0"], "--target_budget 0 is invalid"),
    (["--method_max_context", "H2O=lots"], "--method_max_context item 'H2O=lots'"),
    (["--methods", "SnapKV,NoSuchMethod"], "unknown method 'NoSuchMethod'"),
    (["--methods", " , "], "--methods is empty"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_numbers_give_one_line_before_any_model(bench, no_model, capsys, tmp_path, argv, expected):
    # a valid tiny run with one bad value after it (the later flag wins)
    assert exit_code(bench, TINY_RUN + argv + ["--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_model_path_that_is_not_a_model(bench, no_model, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for spec, expected in ((tmp_path, "is not a model"), (tmp_path / "missing" / "ckpt", "not found"),
                           (tmp_path / "notes.txt", "")):
        assert exit_code(bench, TINY_RUN + ["--model_path", str(spec), "--out_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --model_path") and err.count("\n") == 1, err
        assert expected in err


def test_model_path_unknown_short_name_lists_the_names(bench, no_model, capsys, tmp_path):
    assert exit_code(bench, TINY_RUN + ["--model_path", "smolm2", "--out_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'smolm2' not found" in err and "smollm2, tiny" in err and err.count("\n") == 1


def test_model_path_takes_the_runners_short_names(bench, tmp_path, capsys):
    """--model_path tiny: the embedded checkpoint through pyramidkv.models, recorded with its fingerprint."""
    assert bench.main(TINY_RUN + ["--model_path", "tiny", "--out_dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "clitest.json").read_text())
    assert payload["model"] == "pyramidkv-tiny-llama" and payload["model_fingerprint"]
    assert payload["model_shape"]["layers"] == 2 and payload["complete"]
    assert "pyramidkv-tiny-llama" in capsys.readouterr().out


def test_out_dir_under_a_file_is_refused(bench, no_model, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert exit_code(bench, TINY_RUN + ["--out_dir", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_default_out_dir_is_a_fresh_folder_outside_benchmarks(bench):
    cli = importlib.import_module("cli")
    args = SimpleNamespace(out_dir=None, tag="cpu_tiny_sdpa", no_plots=False, overwrite=False)
    first = cli.choose_out_dir(args, now=datetime(2026, 12, 2, 7, 0, 0, tzinfo=timezone.utc))
    second = cli.choose_out_dir(args, now=datetime(2026, 12, 2, 7, 0, 1, tzinfo=timezone.utc))
    assert first == REPO / "bench_out" / "cpu_tiny_sdpa_20261202T070000Z" and first != second
    assert "/bench_out/" in (REPO / ".gitignore").read_text().split()  # never committed by accident


def test_run_without_out_dir_leaves_committed_results_alone(bench, monkeypatch, tmp_path, capsys):
    cli = importlib.import_module("cli")
    monkeypatch.setattr(cli, "DEFAULT_OUT_ROOT", tmp_path / "bench_out")
    before = committed_results()
    assert bench.main(TINY_RUN) == 0
    assert committed_results() == before
    (folder,) = (tmp_path / "bench_out").iterdir()
    assert folder.name.startswith("clitest_")
    assert {p.name for p in folder.iterdir()} == {"clitest.json", "clitest.csv"}
    # the same folder named explicitly: refused without --overwrite (before the model), replaced with it
    capsys.readouterr()
    stamp = (folder / "clitest.json").read_bytes()
    assert bench.main(TINY_RUN + ["--out_dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "clitest.json already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert (folder / "clitest.json").read_bytes() == stamp
    assert bench.main(TINY_RUN + ["--out_dir", str(folder), "--overwrite"]) == 0
    assert (folder / "clitest.json").read_bytes() != stamp


def test_help_imports_nothing_heavy():
    probe = ("import runpy, sys\n"
             f"sys.argv = [{str(SCRIPT)!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'pyramidkv', 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    assert "--context_lengths" in out
    assert "HEAVY []" in out, out.splitlines()[-1]


def test_every_flag_has_a_help_text_with_its_default():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60).stdout
    options = out.split("options:", 1)[1]
    # one block per flag: its line "  --flag METAVAR" and the indented help lines after it
    blocks = re.split(r"\n(?=  -)", options.strip("\n"))
    flags = [b.split()[0].rstrip(",") for b in blocks]
    assert "--model_path" in flags and "--overwrite" in flags and len(flags) >= 25
    for block in blocks:
        if block.split()[0] in ("-h", "-h,"):
            continue
        text = " ".join(block.split())
        assert "(default: " in text, f"no help text naming its default: {text!r}"
