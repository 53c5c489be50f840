"""run_qa_choice.py: multiple-choice QA by log-likelihood, full vs compressed cache (tiny random Llama)."""
import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_qa_choice  # noqa: E402
from pyramidkv import qa_choice  # noqa: E402
from pyramidkv.predict import CLIError  # noqa: E402
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread  # noqa: E402

_single_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


def read_samples(out):
    with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_qa(ckpt, out, *extra, ratio="0.5", method="SnapKV", split="test[:3]"):
    run_qa_choice.main(["--model_name", ckpt, "--compress_ratio", ratio, "--kv_method", method,
                        "--output_dir", str(out), "--split", split, *extra])


def test_qa_choice_outputs_and_compressed_memory(tiny_ckpt, tmp_path):
    out = tmp_path / "qa"
    run_qa(tiny_ckpt, out)
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["smoke-qa-001", "smoke-qa-002", "smoke-qa-003"]
    assert all(float(r["memory_after_MB"]) < float(r["memory_before_MB"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics_before"]) == {"acc", "acc_norm"} and summary["config"]["smoke_sample"]
    acc = 100 * sum(int(r["correct_after"]) for r in rows) / 3
    assert summary["metrics_after"]["acc"] == pytest.approx(acc)


def test_qa_choice_ratio_zero_scores_equal_full_cache(tiny_ckpt, tmp_path):
    out = tmp_path / "qa"
    run_qa(tiny_ckpt, out, ratio="0")
    for record in read_samples(out):
        assert record["scores_after"] == pytest.approx(record["scores_before"], abs=1e-4)


def test_qa_choice_log_likelihood_matches_one_full_forward(tiny_ckpt):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    context, choice = [0, 5, 9, 17, 33, 41, 8, 12, 60, 70, 3, 4], [21, 22, 23]
    scores = qa_choice.score_choices(model, context, [choice, [7]])["scores"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context + choice])).logits[0].float(), -1)
    expected = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(choice))
    assert scores[0] == pytest.approx(expected, abs=1e-4)
    assert scores[1] == pytest.approx(float(logprobs[len(context) - 1, 7]), abs=1e-4)


@pytest.mark.parametrize("line, expected", [
    ('{"context": "c", "choices": [" a", " b"]}', "missing field 'gold'"),
    ('{"context": "c", "choices": [" a"], "gold": 0}', "at least 2 non-empty strings"),
    ('{"context": "c", "choices": [" a", " b"], "gold": 2}', "'gold' 2 is not an index"),
    ('{"context": "c", "choices": [" a", " b"], "gold": 0', "malformed JSON line"),
])
def test_qa_choice_bad_lines(tmp_path, line, expected):
    path = tmp_path / "q.jsonl"
    path.write_text('{"context": "c", "choices": [" a", " b"], "gold": 1}\n' + line + "\n")
    with pytest.raises(CLIError, match=rf"^{path}:2: .*{expected}"):
        qa_choice.load_questions(str(path))


def test_qa_choice_resume_and_settings_check(tiny_ckpt, tmp_path):
    out = tmp_path / "qa"
    run_qa(tiny_ckpt, out, split="test[:2]")
    first = read_samples(out)
    run_qa(tiny_ckpt, out, split="test[:3]")
    assert read_samples(out)[:2] == first and len(read_samples(out)) == 3
    with pytest.raises(CLIError, match=r"compress_ratio 0.5 \(now 0.7\)"):
        run_qa(tiny_ckpt, out, ratio="0.7")
