"""run_summarization.py: CSV/JSON contract, resume, settings check, split syntax, data sources, bad inputs.

All runs use a tiny random Llama + BPE tokenizer saved to a temp dir and the bundled smoke sample or
small local files; the hub is never contacted (HF_HUB_OFFLINE=1)."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_summarization  # noqa: E402
from pyramidkv import predict, summarization, summary_prompt  # noqa: E402
from pyramidkv.predict import CLIError  # noqa: E402
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread  # noqa: E402

_single_thread = pytest.fixture(autouse=True)(one_torch_thread)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SimCalKV's per-sample columns (issue 20), then the reference and per-sample ROUGE F1
ISSUE_COLUMNS = ["id", "dataset", "kv_method", "memory_before_MB", "memory_after_MB", "time_before_s",
                 "time_after_s", "throughput_before_tokens_s", "throughput_after_tokens_s", "answer_before",
                 "answer_after", "reference", "rouge1_before", "rouge2_before", "rougeL_before",
                 "rouge1_after", "rouge2_after", "rougeL_after"]
ISSUE_SUMMARY_KEYS = {"metrics_before", "metrics_after", "avg_memory_saving_MB", "time_before", "time_after",
                      "avg_time_saving_s", "throughput_before", "throughput_after",
                      "avg_throughput_improvement_tokens_s", "config"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


def run(ckpt, out, *extra, split="test[:2]", ratio="0.5", method="SnapKV"):
    run_summarization.main(["--model_name", ckpt, "--dataset", "cnn_dailymail", "--split", split,
                            "--compress_ratio", ratio, "--kv_method", method, "--output_dir", str(out),
                            "--max_new_tokens", "4", "--data_dir", str(out) + "_nodata", *extra])


def read_csv(out):
    with open(os.path.join(out, "results.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_samples(out):
    with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_csv_and_json_contract(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run(tiny_ckpt, out)
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ISSUE_COLUMNS
    rows = read_csv(out)
    assert [r["id"] for r in rows] == ["smoke-001", "smoke-002"]
    assert {r["dataset"] for r in rows} == {"cnn_dailymail"} and {r["kv_method"] for r in rows} == {"SnapKV"}
    assert all(r["reference"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert ISSUE_SUMMARY_KEYS <= set(summary)
    for side in ("metrics_before", "metrics_after"):
        assert set(summary[side]) == {"rouge1", "rouge2", "rougeL"}
        assert all(0.0 <= v <= 100.0 for v in summary[side].values())
    mean_csv = sum(float(r["memory_before_MB"]) - float(r["memory_after_MB"]) for r in rows) / len(rows)
    assert summary["avg_memory_saving_MB"] == pytest.approx(mean_csv, abs=1e-5)
    config = summary["config"]
    assert config["compress_ratio"] == 0.5 and config["kv_method"] == "SnapKV"
    assert config["max_prompt_tokens"] == 1024 and config["max_new_tokens"] == 4  # CNN/DM's prefill budget
    assert config["data_source"] == "smoke" and "per sample" in config["budget_rule"]


def test_memory_is_the_stored_kv_bytes_and_compression_lowers_it(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run(tiny_ckpt, out, split="test[:1]")
    (record,) = read_samples(out)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head_dim x fp32 bytes
    # the last generated token is never fed back, so its K/V are not stored
    assert record["kv_bytes_before"] == per_token * (record["prompt_tokens"] + record["new_tokens_before"] - 1)
    assert record["kv_bytes_after"] == per_token * (record["kv_budget"] + record["new_tokens_after"] - 1)
    assert record["kv_budget"] == -(-record["prompt_tokens"] // 2) < record["prompt_tokens"]
    assert record["kept_tokens_after"] == [record["kv_budget"]] * 2
    (row,) = read_csv(out)
    assert float(row["memory_after_MB"]) < float(row["memory_before_MB"])


def test_ratio_zero_keeps_everything_and_answers_match(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    run(tiny_ckpt, out, ratio="0")
    for record in read_samples(out):
        assert record["kv_budget"] == record["prompt_tokens"]
        assert record["answer_after"] == record["answer_before"]
        assert record["kv_bytes_after"] == record["kv_bytes_before"]


def test_resume_skips_finished_ids(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(tiny_ckpt, out, split="test[:2]")
    first = read_samples(out)
    computed = []
    original = run_summarization.run_sample
    monkeypatch.setattr(run_summarization, "run_sample",
                        lambda args, model, tok, spec, row, *rest: computed.append(row["id"]) or original(
                            args, model, tok, spec, row, *rest))
    run(tiny_ckpt, out, split="test[:3]")
    assert computed == ["smoke-003"]
    assert read_samples(out)[:2] == first
    assert [r["id"] for r in read_csv(out)] == ["smoke-001", "smoke-002", "smoke-003"]
    computed.clear()
    run(tiny_ckpt, out, split="test[1:2]")  # a sub-slice: nothing to compute, outputs cover that slice
    assert computed == [] and [r["id"] for r in read_csv(out)] == ["smoke-002"]
    assert json.loads((out / "summary.json").read_text())["num_samples"] == 1


def test_rerun_with_other_settings_is_refused_before_loading(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(tiny_ckpt, out, split="test[:1]")
    monkeypatch.setattr(predict, "load_model_and_tokenizer", lambda args: pytest.fail("model loaded"))
    with pytest.raises(CLIError) as err:
        run(tiny_ckpt, out, split="test[:1]", ratio="0.6", method="H2O")
    message = str(err.value)
    assert "\n" not in message and "compress_ratio 0.5 (now 0.6)" in message
    assert "kv_method 'SnapKV' (now 'H2O')" in message and str(out) in message


@pytest.mark.parametrize("split, rows", [
    ("test", list(range(10))), ("test[:3]", [0, 1, 2]), ("test[2:4]", [2, 3]), ("test[-2:]", [8, 9]),
    ("test[:50%]", [0, 1, 2, 3, 4]), ("test[-20%:]", [8, 9]), ("train[:2]+train[-1:]", [0, 1, 9]),
    (" validation [ 1 : 3 ] ", [1, 2]), ("test[:10]", list(range(10))),
])
def test_split_syntax(split, rows):
    assert summarization.select_rows(summarization.parse_split(split), 10, split, "x") == rows


@pytest.mark.parametrize("split", ["test[:a]", "test[1:2:3]", "test[", "[:3]", "test[:3]+", "test(:3)"])
def test_bad_split_syntax(split):
    with pytest.raises(CLIError, match="datasets slicing syntax"):
        summarization.parse_split(split)


@pytest.mark.parametrize("split", ["test[:11]", "test[5:20]", "test[-11:]", "test[:200%]"])
def test_slice_past_the_end(split):
    with pytest.raises(CLIError) as err:
        summarization.select_rows(summarization.parse_split(split), 10, split, "the sample")
    message = str(err.value)
    assert "\n" not in message and ("10 rows" in message or "not a percentage" in message)


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "foo"], "unknown --dataset 'foo'; choose one of: cnn_dailymail"),
    (["--split", "test[:x]"], "bad --split 'test[:x]'"),
    (["--split", "test[:100]"], "reaches past the end of bundled smoke sample"),
    (["--compress_ratio", "1"], "--compress_ratio 1.0 is outside [0, 1)"),
    (["--compress_ratio", "-0.2"], "--compress_ratio -0.2 is outside [0, 1)"),
    (["--kv_method", "Nope"], "unknown method 'Nope'"),
    (["--window_size", "0"], "--window_size 0 must be at least 1"),
    (["--dataset", "missing.jsonl"], "no such file"),
])
def test_bad_inputs_are_one_line_errors_before_the_model(argv, expected, monkeypatch, tmp_path):
    monkeypatch.setattr(predict, "load_model_and_tokenizer", lambda args: pytest.fail("model loaded"))
    with pytest.raises(CLIError) as err:
        run_summarization.main(["--model_name", "unused", "--output_dir", str(tmp_path / "o"),
                                "--data_dir", str(tmp_path), *argv])
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_cli_exit_status_and_message(tmp_path):
    proc = subprocess.run([sys.executable, "run_summarization.py", "--compress_ratio", "1.5",
                           "--output_dir", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --compress_ratio 1.5 is outside [0, 1)")


def test_help_imports_nothing_heavy():
    code = ("import sys, run_summarization as r; r.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'pyramidkv', 'datasets') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "cnn_dailymail_test.jsonl"
    path.write_text('{"id": "a", "article": "x", "highlights": "y"}\n\n{"id": "b", "article": "z"}\n')
    with pytest.raises(CLIError, match=rf"^{path}:3: missing field 'highlights'"):
        summarization.load_samples(str(path), "test", str(tmp_path))


def test_longbench_gov_report_file_from_data_dir(tiny_ckpt, tmp_path):
    data = tmp_path / "data" / "LongBench"
    data.mkdir(parents=True)
    lines = [{"input": "", "context": f"Report {i}. The agency reviewed the program.", "answers": [f"Summary {i}."],
              "length": 7, "dataset": "gov_report", "language": "en", "all_classes": None, "_id": f"g{i}"}
             for i in range(3)]
    (data / "gov_report.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    run_summarization.main(["--model_name", tiny_ckpt, "--dataset", "LongBench/gov_report", "--split",
                            "train[:2]", "--data_dir", str(tmp_path / "data"), "--output_dir", str(out),
                            "--max_new_tokens", "3"])
    rows = read_csv(out)
    assert [r["id"] for r in rows] == ["g0", "g1"] and rows[1]["reference"] == "Summary 1."
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["data_source"] == "local" and config["max_prompt_tokens"] == 4096  # GovReport's budget


@pytest.mark.parametrize("ext", ["parquet", "arrow", "json"])
def test_local_table_files(tmp_path, ext):
    import datasets
    table = datasets.Dataset.from_dict({"document": ["d0", "d1", "d2"], "summary": ["s0", "s1", "s2"]})
    path = tmp_path / f"mine.{ext}"
    if ext == "parquet":
        table.to_parquet(str(path))
    elif ext == "json":
        path.write_text(json.dumps(table.to_list()))
    else:
        table.save_to_disk(str(tmp_path / "saved"))
        (arrow,) = [f for f in os.listdir(tmp_path / "saved") if f.endswith(".arrow")]
        os.rename(tmp_path / "saved" / arrow, path)
    samples = summarization.load_samples(str(path), "train[1:]", str(tmp_path))
    assert samples.source == "local" and samples.spec.name == "local"
    assert [(r["id"], r["document"], r["reference"]) for r in samples.rows] == [
        ("train-1", "d1", "s1"), ("train-2", "d2", "s2")]


def test_offline_hub_falls_back_to_the_smoke_sample_quickly(tmp_path, monkeypatch):
    import socket
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network probed"))
    start = time.perf_counter()
    samples = summarization.load_samples("xsum", "test[:2]", str(tmp_path))
    assert time.perf_counter() - start < 20
    assert samples.source == "smoke" and "NOT xsum" in samples.description
    assert "hub unreachable" in samples.description and len(samples.rows) == 2
    assert samples.spec.max_prompt_tokens == 512 and samples.spec.max_new_tokens == 64


def test_hub_probe_failure_switches_datasets_offline(monkeypatch):
    import socket
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    assert not summarization.hub_reachable(timeout=0.1)
    summarization.force_offline()
    import datasets.config
    assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE


def test_kv_budget_rule():
    assert summary_prompt.kv_budget(100, 0.0, 8) == 100
    assert summary_prompt.kv_budget(100, 0.4, 8) == 60
    assert summary_prompt.kv_budget(101, 0.4, 8) == 61  # ceil
    assert summary_prompt.kv_budget(20, 0.9, 8) == 9  # never at or below the window
    assert summary_prompt.kv_budget(100, 0.7, 8) == 30  # (1 - 0.7) * 100 = 30.000000000000004 in floats


def test_long_document_is_truncated_to_the_prompt_budget(tiny_ckpt):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    spec = summarization.DATASETS["xsum"]
    ids, truncated = summary_prompt.build_prompt(tokenizer, spec, "The quick brown fox jumps. " * 300, 120)
    assert truncated and 110 <= len(ids) <= 120
    assert tokenizer.decode(ids).rstrip().endswith("Summarize the above article in 1 sentence.")
    short, cut = summary_prompt.build_prompt(tokenizer, spec, "A short text.", 120)
    assert not cut and len(short) < 100


def test_helm_file_with_cam_ratios(tiny_ckpt, tmp_path):
    """CaM's HELM-style input (article = whole prompt, summary_gt, max_tokens, stop) and its
    --start_ratio/--recent_ratio budget: window = recent part, budget = (start + recent) of the prompt."""
    path = tmp_path / "cnndm_0shot.jsonl"
    lines = [{"article": f"###\nArticle: Story {i} about the bridge.\n\nSummarize the above article in 3 sentences.\n",
              "summary_gt": f"Bridge story {i}.", "max_tokens": 3, "stop": ["###"], "temperature": 0.3}
             for i in range(2)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    run_summarization.main(["--model_name", tiny_ckpt, "--input_path", str(path), "--method", "streamingllm",
                            "--start_ratio", "0.25", "--recent_ratio", "0.25", "--output_dir", str(out)])
    config = json.loads((out / "config.json").read_text())["settings"]
    assert config["dataset"] == "cnn_dailymail" and config["compress_ratio"] == 0.5
    assert config["kv_method"] == "StreamingLLM"
    for record in read_samples(out):
        prompt = record["prompt_tokens"]
        assert record["window_size"] == -(-prompt // 4) and record["kv_budget"] == -(-prompt // 2)
        assert record["new_tokens_before"] <= 3  # the request's max_tokens
        assert "###" not in record["answer_before"]


def test_helm_prompt_is_middle_truncated_keeping_the_instruction(tiny_ckpt):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt)
    prompt = "###\nArticle: " + "The quick brown fox jumps. " * 300 + "\n\nSummarize the above article in 1 sentence.\n"
    ids, truncated = summary_prompt.build_prompt(tokenizer, summarization.DATASETS["xsum"], prompt, 100,
                                                complete_prompt=True)
    text = tokenizer.decode(ids)
    assert truncated and len(ids) <= 100 and "Summarize the above article in 1 sentence." in text
    assert "###\nArticle:" in text


@pytest.mark.parametrize("argv, expected", [
    (["--start_ratio", "0.2"], "give both"),
    (["--start_ratio", "0.7", "--recent_ratio", "0.5"], "0 < start + recent <= 1"),
    (["--compress_ratio", "0.3", "--start_ratio", "0.1", "--recent_ratio", "0.1"], "give one or the other"),
])
def test_cam_ratio_errors(argv, expected, tmp_path):
    with pytest.raises(CLIError) as err:
        run_summarization.main(["--model_name", "unused", "--output_dir", str(tmp_path / "o"), *argv])
    assert expected in str(err.value)


def test_plot_script_table_and_png(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import plot_summarization
    for method, ratio, rouge_l in (("SnapKV", 0.4, 20.0), ("SnapKV", 0.8, 10.0), ("H2O", 0.4, 25.0)):
        directory = tmp_path / f"{method}_{ratio}"
        directory.mkdir()
        metrics = {"rouge1": 30.0, "rouge2": 5.0, "rougeL": rouge_l}
        (directory / "summary.json").write_text(json.dumps({
            "num_samples": 3, "metrics_before": {"rouge1": 40.0, "rouge2": 15.0, "rougeL": 30.0},
            "metrics_after": metrics, "memory_before_MB": 12.0, "memory_after_MB": 8.0,
            "config": {"kv_method": method, "compress_ratio": ratio, "model_name": "m"}}))
    table, png = tmp_path / "t.md", tmp_path / "p.png"
    plot_summarization.main([str(d) for d in sorted(tmp_path.glob("*_0.*"))] + ["--table", str(table),
                                                                                "--plot", str(png)])
    lines = table.read_text().splitlines()
    assert lines[2] == "| full cache | 0 | 40.00 | 15.00 | 30.00 | |"
    assert lines[3:] == ["| H2O | 0.4 | 30.00 | 5.00 | 25.00 | 12.00 -> 8.00 |",
                         "| SnapKV | 0.4 | 30.00 | 5.00 | 20.00 | 12.00 -> 8.00 |",
                         "| SnapKV | 0.8 | 30.00 | 5.00 | 10.00 | 12.00 -> 8.00 |"]
    assert png.stat().st_size > 1000


def test_hub_rows_through_datasets_and_online_failure(tmp_path, monkeypatch):
    """The hub path without a network: load_dataset stubbed (a cached copy / an online failure)."""
    import datasets
    calls = []

    def cached_copy(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"id": ["a", "b", "c"], "article": ["d0", "d1", "d2"],
                                           "highlights": ["s0", "s1", "s2"]})
    monkeypatch.setattr(datasets, "load_dataset", cached_copy)
    samples = summarization.load_samples("cnn_dailymail", "test[1:]", str(tmp_path))
    assert calls == [("cnn_dailymail", "3.0.0", "test")] and samples.source == "hub"
    assert [(r["id"], r["document"], r["reference"]) for r in samples.rows] == [("b", "d1", "s1"), ("c", "d2", "s2")]
    assert "cached copy (offline)" in samples.description

    def broken(name, config, split):
        raise ValueError("Dataset scripts are no longer supported\nsecond line")
    monkeypatch.setattr(datasets, "load_dataset", broken)
    monkeypatch.setattr(summarization, "hub_reachable", lambda timeout=3.0: True)
    with pytest.raises(CLIError) as err:
        summarization.load_samples("xsum", "test[:2]", str(tmp_path))
    assert "\n" not in str(err.value) and "cannot load xsum" in str(err.value)
    assert "Dataset scripts are no longer supported; put the data in a local file" in str(err.value)


def test_helm_h2o_ratios_hold_the_cache_while_generating(tiny_ckpt, tmp_path):
    """CaM's --enable_small_cache runs of H2O: heavy = floor(start * S) + recent = floor(recent * S) fixed from
    the prompt and held while generating (the decode form), so the K/V after generation is exactly that many
    tokens per layer; the prefill-only form would hold them plus every generated token."""
    from transformers import AutoConfig
    path = tmp_path / "xsum_0shot.jsonl"
    article = " ".join(f"The bridge over river {i} was closed for repairs on day {i}." for i in range(12))
    lines = [{"article": f"###\nArticle: {article}\n\nSummarize the above article in 1 sentence.\n",
              "summary_gt": "Bridges closed.", "max_tokens": 6, "stop": ["###"]}]
    path.write_text(json.dumps(lines[0]) + "\n")
    out = tmp_path / "out"
    run_summarization.main(["--model_name", tiny_ckpt, "--input_path", str(path), "--method", "h2o",
                            "--start_ratio", "0.1", "--recent_ratio", "0.2", "--output_dir", str(out)])
    config = AutoConfig.from_pretrained(tiny_ckpt)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    token_bytes = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4  # fp32
    [record] = read_samples(out)
    prompt = record["prompt_tokens"]
    heavy, recent = int(0.1 * prompt + 1e-9), int(0.2 * prompt + 1e-9)
    assert record["kv_budget"] == heavy + recent and record["window_size"] == recent
    assert record["new_tokens_after"] >= 3
    assert record["kv_bytes_after"] == (heavy + recent) * token_bytes


def test_helm_h2o_ratio_zero_heavy_is_a_one_line_error(tiny_ckpt, tmp_path):
    """run_summarization accepts --start_ratio 0 (StreamingLLM: no sinks), but H2O's heavy budget needs a ratio
    in (0, 1]: refused before any data or model is loaded."""
    with pytest.raises(CLIError, match=r"^heavy_ratio=0.0 is invalid: .*\(0, 1\]$"):
        run_summarization.main(["--model_name", tiny_ckpt, "--dataset", "cnn_dailymail", "--method", "h2o",
                                "--start_ratio", "0", "--recent_ratio", "0.2", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
