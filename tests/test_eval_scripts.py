"""The PyramidKV-style shell entry points name results directories as the runners do (after the
resolved model: `tiny` -> pyramidkv-tiny-llama, smollm2 -> SmolLM2-135M-Instruct), so their final
eval.py call scores what was just predicted."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sh(script, args, tmp_path, **env):
    proc = subprocess.run(["sh", os.path.join(ROOT, "scripts", script), *args], cwd=str(tmp_path),
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    return proc


def test_longbench_eval_sh_scores_the_tiny_short_name(tmp_path):
    proc = _sh("scripts_longBench/eval.sh", ["0", "SnapKV", "32", "sdpa", str(tmp_path), "tiny"], tmp_path,
               EXTRA_ARGS="--datasets samsum --max_num_examples 1 --max_length 300")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results_long_bench" / "pyramidkv-tiny-llama_32" / "results.json").read_text())
    assert set(results) == {"SnapKV"} and "samsum" in results["SnapKV"]


def test_ruler_eval_sh_scores_the_tiny_short_name(tmp_path):
    proc = _sh("scripts_ruler/eval.sh", ["0", "StreamingLLM", "48", "sdpa", str(tmp_path), "tiny"], tmp_path,
               TASKS="niah_single_1", NUM_SAMPLES="1", CONTEXT_LENGTHS="512")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results_ruler" / "pyramidkv-tiny-llama_48" / "results.json").read_text())
    assert list(results["StreamingLLM"]) == ["512"]


def test_unknown_model_is_one_line_error(tmp_path):
    for script, args in (("scripts_ruler/eval.sh", ["0", "SnapKV", "64", "sdpa", str(tmp_path), "nosuch"]),
                         ("scripts_longBench/eval.sh", ["0", "SnapKV", "64", "sdpa", str(tmp_path), "nosuch"])):
        proc = _sh(script, args, tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.strip().startswith("error: model 'nosuch' not found") and "\n" not in proc.stderr.strip()


def test_eval_sh_scores_the_directory_extra_args_name(tmp_path, monkeypatch):
    # CommonKV's --factorization whitened and --evict_method add to the directory name; the scripts ask
    # the runner for it (--print_results_dir) instead of rebuilding it, so eval.py scores what ran
    monkeypatch.setenv("PYRAMIDKV_CACHE_DIR", str(tmp_path / "cache"))
    extra = "--layer_step 2 --rank 16 --factorization whitened --calibration_tokens 64 --evict_method SnapKV"
    ruler = _sh("scripts_ruler/eval.sh", ["0", "CommonKV", "48", "sdpa", str(tmp_path), "tiny"], tmp_path,
                TASKS="niah_single_1", NUM_SAMPLES="1", CONTEXT_LENGTHS="512", EXTRA_ARGS=extra)
    assert ruler.returncode == 0, ruler.stderr[-2000:]
    name = "pyramidkv-tiny-llama_48_evictSnapKV_whitened"
    assert "CommonKV" in json.loads((tmp_path / "results_ruler" / name / "results.json").read_text())
    longbench = _sh("scripts_longBench/eval.sh", ["0", "CommonKV", "48", "sdpa", str(tmp_path), "tiny"], tmp_path,
                    EXTRA_ARGS=extra + " --datasets samsum --max_num_examples 1 --max_length 300")
    assert longbench.returncode == 0, longbench.stderr[-2000:]
    assert "samsum" in json.loads((tmp_path / "results_long_bench" / name / "results.json").read_text())["CommonKV"]


def test_print_results_dir_names_each_run_and_loads_nothing(tmp_path, capsys, monkeypatch):
    import run_ruler

    monkeypatch.setattr("pyramidkv.predict.load_model_and_tokenizer", lambda *a, **k: 1 / 0)
    run_ruler.main(["--model_path", "tiny", "--method", "SnapKV,H2O", "--max_capacity_prompts", "64",
                    "--save_dir", str(tmp_path), "--print_results_dir"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "pyramidkv-tiny-llama_64")] * 2
    assert not any(tmp_path.iterdir())


def test_eval_sh_with_only_quant_method_and_nbits(tmp_path):
    # the README's form (no GROUP_SIZE / RESIDUAL_LENGTH): sourcing scripts/lib.sh used to end on a
    # false test, and eval.sh (set -e) exited 1 before predicting anything
    proc = _sh("scripts_ruler/eval.sh", ["0", "SnapKV", "48", "sdpa", str(tmp_path), "tiny"], tmp_path,
               TASKS="niah_single_1", NUM_SAMPLES="1", CONTEXT_LENGTHS="512", QUANT_METHOD="kivi", NBITS="4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = tmp_path / "results_ruler" / "pyramidkv-tiny-llama_48_kivi4" / "results.json"
    assert "SnapKV" in json.loads(results.read_text())


def test_eval_sh_with_a_method_list_scores_their_shared_directory_once(tmp_path):
    proc = _sh("scripts_ruler/eval.sh", ["0", "SnapKV,StreamingLLM", "48", "sdpa", str(tmp_path), "tiny"], tmp_path,
               TASKS="niah_single_1", NUM_SAMPLES="1", CONTEXT_LENGTHS="512")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote ") == 1
    results = json.loads((tmp_path / "results_ruler" / "pyramidkv-tiny-llama_48" / "results.json").read_text())
    assert set(results) == {"SnapKV", "StreamingLLM"}
