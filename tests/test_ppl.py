"""run_ppl.py and pyramidkv.ppl / kvcompress.evaluate_with_compression: the long-text protocol."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import prompt, tiny_model
from test_decode_mechanism import rolling_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import run_ppl  # noqa: E402
from pyramidkv import ppl_compare  # noqa: E402
from pyramidkv import ppl  # noqa: E402

TINY = os.path.join(ROOT, "ckpt", "pyramidkv-tiny-llama")


def oracle_metrics(logits, ids):
    targets = ids[0, 1:]
    nll = -torch.log_softmax(logits[:-1], dim=-1).gather(-1, targets[:, None]).mean()
    return math.exp(float(nll)), float((logits[:-1].argmax(-1) == targets).float().mean())


def test_rolling_ppl_equals_masked_full_cache_oracle():
    model = tiny_model(attn="eager")
    ids = prompt(120, seed=4)
    result = ppl.evaluate_ids(model, ids[0].tolist(), "streaming_llm",
                              {"start_size": 4, "recent_size": 28, "compress_interval": 1})
    perplexity, accuracy = oracle_metrics(rolling_oracle(model, ids, 1, 32, 4), ids)
    assert result["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["kv_cache_tokens"] == 32 and result["kv_cache_tokens_per_layer"] == [32] * 3
    assert result["kv_cache_bytes"] == 3 * 2 * 2 * 32 * 16 * 4  # layers, K+V, KV heads, tokens, head_dim, fp32
    assert result["num_eval_tokens"] == 119 and result["tpot_s"] > 0 and result["throughput_tok_s"] > 0


def test_baseline_equals_one_full_forward():
    model = tiny_model()
    ids = prompt(60, seed=4)
    result = ppl.evaluate_ids(model, ids[0].tolist())
    with torch.no_grad():
        perplexity, accuracy = oracle_metrics(model(ids).logits[0], ids)
    assert result["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["kv_cache_tokens"] == 59


@pytest.fixture(scope="module")
def tiny_pair():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(TINY).eval(), AutoTokenizer.from_pretrained(TINY)


def test_evaluate_with_compression_as_in_cs3602(tiny_pair):
    from pyramidkv.kvcompress import evaluate_with_compression, streaming_llm_compress
    model, tokenizer = tiny_pair
    text = ppl.load_texts()[0][0][:3000]
    results = evaluate_with_compression(model, tokenizer, text, compress_fn=streaming_llm_compress,
                                        compress_kwargs={"start_size": 4, "recent_size": 60}, num_eval_tokens=150)
    assert {"perplexity", "accuracy", "ttft_s", "tpot_s", "kv_cache_tokens"} <= set(results)
    assert results["kv_cache_tokens"] == 64
    ids = ppl.token_ids_for(tokenizer, text, 150)
    same = ppl.evaluate_ids(model, ids, "streaming_llm", {"start_size": 4, "recent_size": 60, "compress_interval": 1})
    assert results["perplexity"] == pytest.approx(same["perplexity"], rel=1e-6)
    full = evaluate_with_compression(model, tokenizer, text, num_eval_tokens=150)
    assert full["kv_cache_tokens"] == 150
    with pytest.raises(ValueError, match="compress_fn=.*valid choices"):
        evaluate_with_compression(model, tokenizer, text, compress_fn=len)


def test_bundled_texts_and_files(tmp_path):
    texts, description = ppl.load_texts("shakespeare", num_samples=2)
    assert len(texts) == 2 and all(len(t) > 100_000 for t in texts) and "public domain" in description
    (tmp_path / "a.txt").write_text("some words here")
    assert ppl.load_texts(data_file=str(tmp_path / "a.txt"))[0] == ["some words here"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert ppl.load_texts(data_file=str(tmp_path / "b.jsonl"), num_samples=5)[0] == ["one", "two"]


@pytest.mark.parametrize("call,match", [
    (lambda: ppl.load_texts("c4"), "dataset_name='c4' is unknown; valid choices: shakespeare, pg19, wikitext"),
    (lambda: ppl.load_texts(data_file="/nonexistent.txt"), "does not exist"),
    (lambda: ppl.load_texts(num_samples=0), "num_samples=0 is invalid"),
])
def test_bad_text_inputs_are_one_line(call, match):
    with pytest.raises(ppl.TextError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_too_short_and_empty_text(tiny_pair):
    _, tokenizer = tiny_pair
    with pytest.raises(ppl.TextError, match="fewer than num_eval_tokens"):
        ppl.token_ids_for(tokenizer, "a few words", 2000)
    with pytest.raises(ppl.TextError, match="empty"):
        ppl.token_ids_for(tokenizer, "  ", 10)


def test_help_does_not_import_torch():
    code = "import sys, run_ppl; run_ppl.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runner_writes_json_csv_and_resumes(tmp_path, capsys):
    args = ["--model_path", "tiny", "--method", "streaming_llm", "--recent_sizes", "28,60", "--num_eval_tokens",
            "80", "--output_dir", str(tmp_path), "--no_progress"]
    assert run_ppl.main(args) == 0
    result = json.loads((tmp_path / "streaming_llm_32.json").read_text())
    assert set(run_ppl.METRICS) <= set(result) and result["kv_cache_tokens"] == 32
    assert result["config"]["recent_size"] == 28
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run,method,cache_size,perplexity")
    capsys.readouterr()
    assert run_ppl.main(args) == 0
    assert "2 already done" in capsys.readouterr().err
    assert run_ppl.main(args[:-1] + ["--seed", "1", "--no_progress"]) == 2
    assert "other settings (seed)" in capsys.readouterr().err


@pytest.mark.parametrize("flags,match", [
    (["--recent_size", "0"], "--recent_size 0 is invalid"),
    (["--method", "streaming_llm", "--cache_sizes", "4"], "recent_size=0 is invalid"),
    (["--method", "snapkv"], "SnapKV has no decode-time form"),
    (["--method", "h2o", "--cache_sizes", "8", "--window_size", "8"], "=8 must be larger than window_size=8"),
    (["--num_eval_tokens", "100000"], "fewer than num_eval_tokens"),
    (["--dataset_name", "c4"], "dataset_name='c4' is unknown"),
])
def test_runner_bad_input_one_line(tmp_path, capsys, flags, match):
    code = run_ppl.main(["--model_path", "tiny", "--output_dir", str(tmp_path), "--no_progress", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and match in err[-1] and err[-1].startswith("error:")


def test_comparison_table_has_change_columns():
    base = {"ttft_s": 0.02, "tpot_s": 0.01, "throughput_tok_s": 100.0, "perplexity": 10.0, "accuracy": 0.5,
            "kv_cache_tokens": 1999}
    other = {**base, "tpot_s": 0.008, "throughput_tok_s": 120.0, "perplexity": 11.0, "kv_cache_tokens": 512,
             "cache_size": 512}
    table = ppl_compare.comparison_table({"baseline": base, "streaming_llm_512": other}, [512])
    assert "| streaming_llm_512 |" in table and "+20.0% | +20.0% | +10.0% | +0.0% |" in table


@pytest.mark.parametrize("pos_shift", [[], ["--enable_pos_shift"]])
@pytest.mark.parametrize("method", [*run_ppl.COMPARE_METHODS, "l2_compress", "streamingllm"])
def test_every_method_plans_at_the_default_sizes(method, pos_shift):
    """Each documented `run_ppl.py --method M` builds its methods (h2o once failed: default prefill
    budget 128 below its recent budget of half the cache)."""
    args = run_ppl.build_parser().parse_args(["--method", method, "--cache_sizes", "512,1024", *pos_shift])
    runs = run_ppl.planned_runs(args)
    run_ppl.check_runs(runs)
    assert runs and all(config.get("pos_shift", False) == bool(pos_shift) for _, _, config, _ in runs)


def _synthetic_result(method, size, ppl, throughput, kv_bytes):
    return {"method": method, "cache_size": size, "perplexity": ppl, "accuracy": 0.4, "ttft_s": 0.05,
            "tpot_s": 1 / throughput, "throughput_tok_s": throughput, "kv_cache_tokens": size or 2000,
            "kv_cache_bytes": kv_bytes}


def test_compare_figures_are_drawn_and_the_heatmap_holds_the_table_changes(tmp_path):
    base = _synthetic_result(None, None, 30.0, 10.0, 90_000_000)
    results = {"baseline": base,
               "streaming_llm_512": _synthetic_result("streaming_llm", 512, 33.0, 12.5, 20_000_000),
               "recent_only_512": _synthetic_result("recent_only", 512, 45.0, 12.0, 25_000_000),
               "streaming_llm_1024": _synthetic_result("streaming_llm", 1024, 30.3, 11.0, 45_000_000)}
    paths = ppl_compare.draw_figures(results, [512, 1024], str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["cache_efficiency.png", "method_comparison.png", "method_metric_heatmap.png",
                     "ppl_vs_throughput.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [round(c, 6) for c in ppl_compare.changes(results["streaming_llm_512"], base)] == [25.0, 20.0, 10.0, 0.0]


def test_compare_all_writes_its_table_and_figures(tmp_path, capsys):
    """--compare_all end to end on the tiny checkpoint with a short text: every run's JSON, the markdown
    table (baseline + each method at each size) and the four figures."""
    code = run_ppl.main(["--compare_all", "--model_path", "tiny", "--num_eval_tokens", "80", "--cache_sizes", "64",
                         "--start_size", "4", "--output_dir", str(tmp_path), "--no_progress"])
    assert code == 0
    table = (tmp_path / "compare_all.md").read_text()
    assert "### cache size 64" in table and "| baseline |" in table
    assert all(f"| {m}_64 |" in table for m in run_ppl.COMPARE_METHODS)
    for name in ("method_comparison", "ppl_vs_throughput", "method_metric_heatmap", "cache_efficiency"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
