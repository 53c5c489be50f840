"""A results file belongs to one setting (issue 16 items 1, 2, 10, 11): reruns with other settings are
refused before the model loads, identical reruns resume, method names are canonical, one writer per file."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import eval as eval_cli
import run_longbench
import run_ruler
from pyramidkv import longbench as lb
from pyramidkv import predict
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread

_single_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


@pytest.fixture(autouse=True)
def fake_generate(monkeypatch):
    """Predictions are not what these tests check; the model still loads (and is refused to load)."""
    monkeypatch.setattr(predict, "generate", lambda model, tok, prompts, *a, **k: ["x"] * len(prompts))


def forbid_model_loading(monkeypatch):
    def load(args):
        raise AssertionError("the model was loaded before the run was refused")
    monkeypatch.setattr(predict, "load_model_and_tokenizer", load)


def ruler(checkpoint, save, method, *extra, samples=2):
    argv = ["--method", method, "--model_path", checkpoint, "--save_dir", str(save), "--context_lengths", "1024",
            "--tasks", "niah_single_1", "--num_samples", str(samples), "--max_capacity_prompts", "64", *extra]
    return predict.run_cli(run_ruler.main, argv)


def indices(path):
    return [json.loads(line)["index"] for line in open(path, encoding="utf-8")]


def snapshot(directory):
    return {os.path.join(root, f): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(directory) for f in files}


def test_rerun_with_other_settings_is_refused_and_identical_rerun_resumes(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tiny-llama_64"
    assert ruler(checkpoint, tmp_path, "SnapKV") == 0
    assert ruler(checkpoint, tmp_path, "PyramidKV", "--beta", "20") == 0  # another method joins the dir
    before = snapshot(out)
    capsys.readouterr()
    with monkeypatch.context() as m:
        forbid_model_loading(m)
        for method, extra, change in [("SnapKV", ["--window_size", "16"], "window_size 8 -> 16"),
                                      ("SnapKV", ["--seed", "7"], "seed 42 -> 7"),
                                      ("SnapKV", ["--kernel_size", "5"], "kernel_size 7 -> 5"),
                                      ("SnapKV", ["--pooling", "avgpool"], "pooling maxpool -> avgpool"),
                                      ("SnapKV", ["--gqa_selection", "query_head"], "gqa_selection kv_head -> query_head"),
                                      ("SnapKV", ["--chat_template", "none"], "chat_template auto -> none"),
                                      ("SnapKV", ["--dtype", "bfloat16"], "dtype float32 -> bfloat16"),
                                      ("SnapKV", ["--attn_implementation", "eager"], "attn_implementation sdpa -> eager"),
                                      ("PyramidKV", ["--beta", "2"], "beta 20.0 -> 2.0")]:
            assert ruler(checkpoint, tmp_path, method, *extra) == 2, extra
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"holds {method} results made with other settings ({change})" in err
            assert "pass another --save_dir, or delete its 1 results file(s)" in err
            assert f"1024/niah_single_1/{method}.json" in err
    assert snapshot(out) == before  # nothing predicted, run_meta.json untouched
    # the same settings resume: only the new index is predicted, the history keeps the first run
    assert ruler(checkpoint, tmp_path, "SnapKV", samples=3) == 0
    assert indices(out / "1024" / "niah_single_1" / "SnapKV.json") == [0, 1, 2]
    meta = json.loads((out / "run_meta.json").read_text())
    assert len(meta["SnapKV"]["previous_runs"]) == 1 and meta["SnapKV"]["settings"]["window_size"] == 8
    # deleting the results file, as the message says, lets the new setting start over
    os.remove(out / "1024" / "niah_single_1" / "SnapKV.json")
    assert ruler(checkpoint, tmp_path, "SnapKV", "--window_size", "16") == 0
    assert json.loads((out / "run_meta.json").read_text())["SnapKV"]["settings"]["window_size"] == 16


def test_longbench_rerun_with_other_max_length_is_refused(checkpoint, tmp_path, monkeypatch, capsys):
    def run(max_length):
        return predict.run_cli(run_longbench.main, [
            "--method", "H2O", "--model_path", checkpoint, "--save_dir", str(tmp_path), "--datasets", "trec",
            "--data_dir", lb.SMOKE_DATA_DIR, "--max_capacity_prompts", "64", "--max_length", max_length,
            "--max_num_examples", "1"])
    assert run("600") == 0
    forbid_model_loading(monkeypatch)
    capsys.readouterr()
    assert run("300") == 2
    assert "(max_length 600 -> 300)" in capsys.readouterr().err


def test_another_checkpoint_under_the_same_name_is_refused_before_loading(checkpoint, tmp_path, monkeypatch, capsys):
    model = tmp_path / "tiny-llama"
    shutil.copytree(checkpoint, model)
    assert ruler(str(model), tmp_path / "res", "FullKV") == 0
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # "retrained" under the same name
    forbid_model_loading(monkeypatch)
    capsys.readouterr()
    assert ruler(str(model), tmp_path / "res", "SnapKV") == 2
    assert "holds results of another checkpoint with the same name" in capsys.readouterr().err


def test_method_names_and_aliases_are_canonical(checkpoint, tmp_path):
    out = tmp_path / "tiny-llama_64"
    task_dir = out / "1024" / "niah_single_1"
    assert ruler(checkpoint, tmp_path, "snapkv") == 0
    assert ruler(checkpoint, tmp_path, "SNAPKV", samples=3) == 0  # resumes the same file
    assert indices(task_dir / "SnapKV.json") == [0, 1, 2]
    assert ruler(checkpoint, tmp_path, "knorm") == 0  # the library's aliases
    assert ruler(checkpoint, tmp_path, "streaming") == 0
    assert sorted(p for p in os.listdir(task_dir) if p.endswith(".json")) == \
        ["L2Norm.json", "SnapKV.json", "StreamingLLM.json"]
    assert set(json.loads((out / "run_meta.json").read_text())) == {"SnapKV", "L2Norm", "StreamingLLM"}
    assert eval_cli.main(["--results_dir", str(out)]) == 0
    assert set(json.loads((out / "results.json").read_text())) == {"SnapKV", "L2Norm", "StreamingLLM"}


HOLD_LOCK = """
import sys, time
from pyramidkv import results_dir
with results_dir.locked([sys.argv[1]]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_writer_of_a_results_file_fails_at_once_naming_the_holder(checkpoint, tmp_path, monkeypatch, capsys):
    path = tmp_path / "tiny-llama_64" / "1024" / "niah_single_1" / "SnapKV.json"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with monkeypatch.context() as m:
            forbid_model_loading(m)
            assert ruler(checkpoint, tmp_path, "SnapKV") == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and f"{path} is being written by another run (pid {holder.pid}" in err[0]
        assert ruler(checkpoint, tmp_path, "H2O") == 0  # other methods' files are free
    finally:
        holder.kill()
        holder.wait()
    assert ruler(checkpoint, tmp_path, "SnapKV") == 0  # a dead holder's lock file blocks nothing
    assert indices(path) == [0, 1]


def test_a_method_field_added_later_matches_at_its_default():
    """Results recorded before a method gained a field resume when the field has its default value."""
    from pyramidkv import results_dir
    old = {"method": "SnapKV", "window_size": 8, "seed": 42}
    assert results_dir.settings_diff(old, dict(old, kernel_size=7)) == ""  # SnapKV's default kernel
    assert results_dir.settings_diff(old, dict(old, kernel_size=5)) == "kernel_size (unset) -> 5"
    assert results_dir.settings_diff(old, dict(old, not_a_field=1)) == "not_a_field (unset) -> 1"
    assert results_dir.settings_diff(dict(old, kernel_size=7), old) == "kernel_size 7 -> (unset)"
