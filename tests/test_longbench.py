"""LongBench protocol pieces and the run_longbench.py -> eval.py pipeline on a tiny model."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyramidkv import longbench as lb
from pyramidkv import predict
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as lb_eval  # noqa: E402
import run_longbench  # noqa: E402

CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}<|assistant|>{% endfor %}"


_single_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-chat"), chat_template=CHAT)


def test_reference_files_are_official():
    assert len(lb.DATASET_TO_PROMPT) == 21 and set(lb.DATASET_TO_PROMPT) == set(lb.ALL_DATASETS)
    assert "asconcisely" in lb.DATASET_TO_PROMPT["narrativeqa"]  # upstream typo kept byte-exact
    assert lb.DATASET_TO_MAX_NEW_TOKENS["gov_report"] == 512 and lb.DATASET_TO_MAX_NEW_TOKENS["hotpotqa"] == 32
    assert os.path.exists(os.path.join(lb.REFERENCE_DIR, "README.md"))  # MIT attribution


def test_parse_datasets():
    assert lb.parse_datasets(None) == list(lb.ENGLISH_DATASETS) and len(lb.ENGLISH_DATASETS) == 16
    assert len(lb.parse_datasets("all")) == 21 and len(lb.parse_datasets(None, longbench_e=True)) == 13
    assert lb.parse_datasets("qasper, trec") == ["qasper", "trec"]
    with pytest.raises(predict.CLIError, match=r"unknown LongBench dataset 'qaspr'; valid choices: all, "):
        lb.parse_datasets("qasper,qaspr")
    with pytest.raises(predict.CLIError, match="unknown LongBench-E dataset 'narrativeqa'"):
        lb.parse_datasets("narrativeqa", longbench_e=True)


def test_build_prompt_keeps_braces_in_values():
    sample = {"context": "def f(): return {'a': 1}", "input": "x = {}"}
    prompt = lb.build_prompt("repobench-p", sample)
    assert prompt == "Please complete the code given below. \ndef f(): return {'a': 1}x = {}Next line of code:\n"


def test_truncate_middle(checkpoint):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    words = " ".join(f"w{i}" for i in range(300))
    ids = tokenizer(words)["input_ids"]  # BOS included, as upstream counts it
    assert ids[0] == tokenizer.bos_token_id
    short, n = lb.truncate_middle(tokenizer, words, len(ids))
    assert short == words and n == len(ids)
    cut, n = lb.truncate_middle(tokenizer, words, 40)
    assert n == len(ids)
    head = tokenizer.decode(ids[:20], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-20:], skip_special_tokens=True)
    assert cut == head + tail and cut.startswith("w0 w1") and cut.endswith("w298 w299")
    assert abs(len(tokenizer(cut)["input_ids"]) - 40) <= 2  # re-tokenized at the seam


def test_model_max_length():
    from transformers import LlamaConfig
    assert lb.model_max_length("x/llama2-7B-chat-4k", LlamaConfig())[0] == 3500  # official table
    assert lb.model_max_length("m", LlamaConfig(max_position_embeddings=8192)) == (
        7692, "max_position_embeddings 8192 (capped) - 500")
    assert lb.model_max_length("m", LlamaConfig(max_position_embeddings=1000 * 1000))[0] == 131072 - 500
    assert lb.model_max_length("m", LlamaConfig(max_position_embeddings=512))[0] == 256
    assert lb.model_max_length("m", LlamaConfig(), override=1234) == (1234, "--max_length")


def test_data_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(predict.CLIError, match=r"qasper.jsonl not found: download data.zip"):
        lb.load_jsonl_samples(str(tmp_path / "qasper.jsonl"), "qasper")
    bad = tmp_path / "trec.jsonl"
    good = {"input": "q", "context": "c", "answers": ["a"], "length": 3, "_id": "1"}
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(predict.CLIError, match=r"trec.jsonl:2: malformed JSON line"):
        lb.load_jsonl_samples(str(bad), "trec")
    bad.write_text(json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(predict.CLIError, match=r"trec.jsonl:1: missing field\(s\) answers, length, _id"):
        lb.load_jsonl_samples(str(bad), "trec")


def test_chat_template_after_truncation_except_fewshot_and_code(chat_checkpoint):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(chat_checkpoint)
    sample = {"context": " ".join(["fox"] * 200), "input": "who?"}
    qa, _ = run_longbench.build_model_prompt(tokenizer, "hotpotqa", sample, 30, "auto")
    assert qa.startswith("<|user|>Answer the question") and qa.endswith("<|assistant|>")
    assert len(qa) < 400  # truncated before the template was added: the template tags survive
    for dataset in ("trec", "triviaqa", "samsum", "lcc", "repobench-p"):
        raw, _ = run_longbench.build_model_prompt(tokenizer, dataset, sample, 30, "auto")
        assert "<|user|>" not in raw
    plain, _ = run_longbench.build_model_prompt(tokenizer, "hotpotqa", sample, 30, "none")
    assert "<|user|>" not in plain


def read_ids(path):
    return [json.loads(line)["_id"] for line in open(path, encoding="utf-8")]


SMOKE_SUBSET = "hotpotqa,trec,samsum,passage_retrieval_en"


def test_end_to_end_two_methods_on_the_smoke_sample(checkpoint, tmp_path, capsys):
    save = str(tmp_path / "res")
    for method in ("FullKV", "PyramidKV"):
        argv = ["--method", method, "--model_path", checkpoint, "--save_dir", save, "--datasets", SMOKE_SUBSET,
                "--data_dir", lb.SMOKE_DATA_DIR, "--max_capacity_prompts", "64", "--max_length", "600",
                "--max_num_examples", "1"]
        assert predict.run_cli(run_longbench.main, argv) == 0
    results_dir = os.path.join(save, "tiny-llama_64")
    expected_ids = {d: [json.loads(open(lb.data_file(lb.SMOKE_DATA_DIR, d)).readline())["_id"]]
                    for d in SMOKE_SUBSET.split(",")}
    for dataset, ids in expected_ids.items():
        for method in ("FullKV", "PyramidKV"):
            path = os.path.join(results_dir, dataset, f"{method}.json")
            records = [json.loads(line) for line in open(path, encoding="utf-8")]
            assert [r["_id"] for r in records] == ids
            assert set(records[0]) >= {"pred", "answers", "all_classes", "length", "_id", "dataset", "language"}
    meta = json.load(open(os.path.join(results_dir, "run_meta.json")))
    assert meta["PyramidKV"]["protocol"]["max_length"] == 600
    assert meta["PyramidKV"]["protocol"]["data_source"] == "user"
    assert meta["FullKV"]["protocol"]["chat_template_skipped_for"][0] == "trec"

    assert lb_eval.main(["--results_dir", results_dir]) == 0
    table = capsys.readouterr().out
    assert "FullKV" in table and "PyramidKV" in table and "passage_retrieval_en" in table
    results = json.load(open(os.path.join(results_dir, "results.json")))
    assert set(results) == {"FullKV", "PyramidKV"}
    for scores in results.values():
        assert set(scores) == set(SMOKE_SUBSET.split(",")) | {"average", "average_english"}
        assert all(0.0 <= v <= 100.0 for v in scores.values())
    csv_lines = open(os.path.join(results_dir, "results.csv")).read().splitlines()
    assert csv_lines[0].startswith("method,hotpotqa,") and len(csv_lines) == 3


def test_killed_run_resumes_without_duplicates(checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    smoke = [json.loads(line) for line in open(lb.data_file(lb.SMOKE_DATA_DIR, "hotpotqa"))]
    rows = [dict(smoke[k % len(smoke)], _id=f"q{k}") for k in range(12)]
    (data / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save = str(tmp_path / "res")
    argv = ["--method", "SnapKV", "--model_path", checkpoint, "--save_dir", save, "--datasets", "hotpotqa",
            "--data_dir", str(data), "--max_capacity_prompts", "32", "--max_length", "300", "--num_threads", "1"]
    out = os.path.join(save, "tiny-llama_32", "hotpotqa", "SnapKV.json")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_longbench.py"), *argv], cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.exists(out) and os.path.getsize(out) > 0):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # killed while later samples are still to come
        proc.wait(timeout=30)
    finally:
        proc.kill()
    first = read_ids(out)
    assert 1 <= len(first) < len(rows)
    with open(out, "a") as f:
        f.write('{"pred": "half a li')  # as if the kill had landed mid-write
    assert predict.run_cli(run_longbench.main, argv) == 0
    resumed = read_ids(out)
    assert resumed == [r["_id"] for r in rows] and resumed[:len(first)] == first  # no duplicates, none lost


def test_longbench_e_run_and_buckets(checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    smoke = [json.loads(line) for line in open(lb.data_file(lb.SMOKE_DATA_DIR, "hotpotqa"))]
    rows = [dict(smoke[0], _id="e0", length=1200), dict(smoke[1], _id="e1", length=9100)]
    (data / "hotpotqa_e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save = str(tmp_path / "res")
    argv = ["--method", "StreamingLLM", "--model_path", checkpoint, "--save_dir", save, "--longbench_e",
            "--datasets", "hotpotqa", "--data_dir", str(data), "--max_capacity_prompts", "32", "--max_length", "300"]
    assert predict.run_cli(run_longbench.main, argv) == 0
    results_dir = os.path.join(save, "tiny-llama_32")
    assert read_ids(os.path.join(results_dir, "hotpotqa_e", "StreamingLLM.json")) == ["e0", "e1"]
    assert lb_eval.main(["--results_dir", results_dir, "--longbench_e"]) == 0
    buckets = json.load(open(os.path.join(results_dir, "results_e.json")))["StreamingLLM"]["hotpotqa"]
    assert set(buckets) == {"0-4k", "4-8k", "8k+"} and buckets["4-8k"] is None
    assert buckets["0-4k"] is not None and buckets["8k+"] is not None


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_a_sweep_predicts_what_one_run_per_method_and_budget_does(tmp_path):
    """--method A,B --max_capacity_prompts x,y: one shared prefill per prompt, the same files as separate
    runs (on the embedded checkpoint, whose answers depend on what is kept; samsum stops at its newline),
    FullKV once, resumable."""
    base = ["--model_path", "tiny", "--datasets", "hotpotqa,samsum", "--data_dir", lb.SMOKE_DATA_DIR,
            "--max_length", "400", "--window_size", "4"]
    methods, budgets = ["FullKV", "snapkv", "PyramidKV", "StreamingLLM"], ["24", "96"]
    for method in methods:
        for budget in budgets:
            if method == "FullKV" and budget != budgets[0]:
                continue
            argv = base + ["--method", method, "--max_capacity_prompts", budget, "--save_dir", str(tmp_path / "one")]
            assert predict.run_cli(run_longbench.main, argv) == 0
    # a sweep stopped after the first sample of each dataset resumes where it stopped
    sweep_argv = base + ["--method", ",".join(methods), "--max_capacity_prompts", ",".join(budgets),
                         "--save_dir", str(tmp_path / "sweep"), "--eval_batch_size", "2"]
    assert predict.run_cli(run_longbench.main, sweep_argv + ["--max_num_examples", "1"]) == 0
    assert predict.run_cli(run_longbench.main, sweep_argv) == 0
    one, sweep = tmp_path / "one", tmp_path / "sweep"
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*.json") if p.name != "run_meta.json")
    assert files == sorted(str(p.relative_to(sweep)) for p in sweep.rglob("*.json") if p.name != "run_meta.json")
    assert len(files) == 2 * 7 and "pyramidkv-tiny-llama_96/samsum/FullKV.json" not in files  # FullKV once
    preds = set()
    for name in files:
        expected = sorted(_lines(one / name), key=lambda r: r["_id"])
        got = sorted(_lines(sweep / name), key=lambda r: r["_id"])
        assert len(got) == 2 and got == expected, name
        preds.add(tuple(r["pred"] for r in got))
    assert len(preds) > 4  # methods and budgets really answer differently
    meta = json.loads((sweep / "pyramidkv-tiny-llama_96" / "run_meta.json").read_text())
    assert set(meta) == {"SnapKV", "PyramidKV", "StreamingLLM"}


def test_sweep_table_methods_by_budgets_labelled_not_longbench(tmp_path, capsys):
    # loaded by path under its own name: scripts/scripts_ruler/sweep_table.py is another `sweep_table`
    spec = importlib.util.spec_from_file_location(
        "longbench_sweep_table", os.path.join(ROOT, "scripts", "scripts_longBench", "sweep_table.py"))
    sweep_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep_table)

    runs = {128: {"FullKV": (80.0, 60.0), "SnapKV": (40.0, 20.0)}, 512: {"SnapKV": (70.0, 50.0), "H2O": (10.0, 30.0)}}
    for budget, methods in runs.items():
        directory = tmp_path / f"m_{budget}"
        directory.mkdir()
        results = {m: {"trec": a, "hotpotqa": b, "average_english": (a + b) / 2, "average": (a + b) / 2}
                   for m, (a, b) in methods.items()}
        (directory / "results.json").write_text(json.dumps(results))
        (directory / "run_meta.json").write_text(json.dumps({m: {"protocol": {"data_source": "smoke"}} for m in methods}))
    argv = ["--results_root", str(tmp_path), "--model_name", "m", "--budgets", "128,512", "--methods", "FullKV,SnapKV"]
    assert sweep_table.main(argv) == 0
    md = (tmp_path / "sweep_m.md").read_text()
    assert md.startswith("**LongBench protocol on the bundled smoke sample") and "NOT LongBench" in md.splitlines()[0]
    lines = md.splitlines()
    assert lines[2:7] == ["| method | budget 128 | budget 512 |", "|---|---|---|", "| FullKV* | 70.00 | 70.00 |",
                          "| SnapKV | 30.00 | 60.00 |", "| H2O | - | 20.00 |"]
    per_dataset = lines[lines.index("| method | budget | hotpotqa | trec | average_english | average |"):]
    assert per_dataset[2:] == ["| FullKV | all | 60.00 | 80.00 | 70.00 | 70.00 |",
                               "| SnapKV | 128 | 20.00 | 40.00 | 30.00 | 30.00 |",
                               "| SnapKV | 512 | 50.00 | 70.00 | 60.00 | 60.00 |",
                               "| H2O | 512 | 30.00 | 10.00 | 20.00 | 20.00 |"]
    assert (tmp_path / "sweep_m.csv").read_text().splitlines()[:2] == [
        "method,budget,hotpotqa,trec,average_english,average", "FullKV,all,60.0,80.0,70.0,70.0"]
    saved = json.loads((tmp_path / "sweep_m.json").read_text())
    assert saved["average"]["FullKV"] == {"128": 70.0, "512": 70.0} and "NOT LongBench" in saved["title"]
    for directory in ("m_128", "m_512"):  # real LongBench data: no smoke label
        (tmp_path / directory / "run_meta.json").write_text(json.dumps({"SnapKV": {"protocol": {"data_source": "LongBench"}}}))
    assert sweep_table.main(argv) == 0
    assert (tmp_path / "sweep_m.md").read_text().startswith("**LongBench (data/LongBench)**")
    capsys.readouterr()
    assert sweep_table.main(argv[:3] + ["x", "--budgets", "128"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: no results.json under")


def test_sweep_script_runs_one_table_from_the_resolved_model_name(tmp_path):
    """sweep.sh on `tiny`: results in {save}/results_long_bench/pyramidkv-tiny-llama_{budget} (the resolved
    name, not basename 'tiny'), scored per budget, one table titled NOT LongBench (smoke sample)."""
    env = dict(os.environ, SAVE_ROOT=str(tmp_path), DATASETS="samsum", METHODS="FullKV SnapKV", BUDGETS="32 64",
               MAX_NUM_EXAMPLES="1", EXTRA_ARGS="--max_length 300")
    proc = subprocess.run(["sh", os.path.join(ROOT, "scripts", "scripts_longBench", "sweep.sh"), "tiny"], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    root = tmp_path / "results_long_bench"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["pyramidkv-tiny-llama_32", "pyramidkv-tiny-llama_64"]
    assert (root / "pyramidkv-tiny-llama_64" / "results.json").exists()
    md = (root / "sweep_pyramidkv-tiny-llama.md").read_text()
    assert "NOT LongBench" in md.splitlines()[0] and "| SnapKV | 64 |" in md
