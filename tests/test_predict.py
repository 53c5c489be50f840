"""Shared predict loop: resumable jsonl files, run metadata, model loading errors, generation."""
import argparse
import json
import os

import pytest

from pyramidkv import predict, result_files
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread


_single_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


def parse(argv):
    parser = argparse.ArgumentParser()
    predict.add_common_args(parser)
    return parser.parse_args(argv)


def test_defaults_and_method_config():
    args = parse([])
    assert args.method == "FullKV" and args.max_capacity_prompts == 128 and args.attn_implementation == "sdpa"
    assert args.model_path == predict.DEFAULT_MODEL == "smollm2"
    assert predict.method_config(args) == {"max_capacity_prompt": 128, "window_size": 8, "kernel_size": 7,
                                           "pooling": "maxpool"}
    assert predict.method_config(parse(["--beta", "10"]))["beta"] == 10
    assert predict.model_name(parse(["--model_path", "meta-llama/Llama-3-8B-Instruct"])) == "Llama-3-8B-Instruct"
    assert predict.model_name(parse(["--model_path", "tiny"])) == "pyramidkv-tiny-llama"


def test_unknown_method_is_one_line_error():
    with pytest.raises(predict.CLIError, match=r"unknown method 'nope'; valid choices: FullKV, SnapKV.*aliases"):
        predict.check_method("nope")
    assert predict.check_method("pyramidkv") == "PyramidKV"  # any case, canonical spelling back
    # every alias the library accepts (issue 16 item 11)
    assert [predict.check_method(a) for a in ("knorm", "STREAMING", "knormpress")] == ["L2Norm", "StreamingLLM",
                                                                                     "L2Norm"]
    args = parse(["--method", "snapkv"])
    predict.validate_method_args(args)
    assert args.method == "SnapKV"
    with pytest.raises(predict.CLIError, match="window_size=200"):
        predict.validate_method_args(parse(["--method", "SnapKV", "--window_size", "200"]))
    with pytest.raises(predict.CLIError, match="unknown config"):
        predict.validate_method_args(parse(["--method", "SnapKV", "--sink_size", "4"]))
    predict.validate_method_args(parse(["--method", "StreamingLLM", "--sink_size", "4"]))


def test_append_and_done_ids_survive_a_truncated_last_line(tmp_path):
    path = str(tmp_path / "sub" / "m.json")
    assert result_files.load_done_ids(path) == set()
    result_files.append_jsonl(path, {"_id": "a", "pred": "x"})
    result_files.append_jsonl(path, {"_id": "b", "pred": "ü"})
    with open(path, "a") as f:
        f.write('{"_id": "c", "pr')  # a crash mid-write
    assert result_files.load_done_ids(path) == {"a", "b"}
    result_files.append_jsonl(path, {"_id": "c", "pred": "z"})
    lines = open(path, encoding="utf-8").read().splitlines()
    assert [json.loads(line)["_id"] for line in lines] == ["a", "b", "c"]
    assert result_files.load_done_ids(path, key="pred") == {"x", "ü", "z"}


def test_write_run_meta_keeps_each_method_and_history(tmp_path):
    args = parse(["--method", "SnapKV"])
    predict.write_run_meta(str(tmp_path), args, {"truncation": "middle"})
    predict.write_run_meta(str(tmp_path), parse(["--method", "H2O"]), {"truncation": "middle"})
    predict.write_run_meta(str(tmp_path), args, {"truncation": "middle"})
    meta = json.load(open(tmp_path / "run_meta.json"))
    assert set(meta) == {"SnapKV", "H2O"}
    snap = meta["SnapKV"]
    assert snap["method_config"]["max_capacity_prompt"] == 128 and snap["protocol"] == {"truncation": "middle"}
    assert snap["versions"]["torch"] and snap["versions"]["transformers"] and len(snap["previous_runs"]) == 1
    assert os.listdir(tmp_path) == ["run_meta.json"]


def test_results_of_another_checkpoint_are_not_resumed(tmp_path):
    model_dir, out = tmp_path / "tiny", str(tmp_path / "results")
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "tokenizer.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"old weights")
    args = parse(["--method", "SnapKV", "--model_path", str(model_dir)])
    predict.write_run_meta(out, args, {})
    predict.write_run_meta(out, parse(["--method", "H2O", "--model_path", str(model_dir)]), {})  # same model
    (model_dir / "model.safetensors").write_bytes(b"new weights")  # retrained under the same name
    with pytest.raises(predict.CLIError, match="results of another checkpoint.*another --save_dir"):
        predict.write_run_meta(out, args, {})
    assert set(json.load(open(os.path.join(out, "run_meta.json")))) == {"SnapKV", "H2O"}  # untouched


def test_missing_model_and_flash_attention_errors(tmp_path, checkpoint):
    with pytest.raises(predict.CLIError, match="not found: not a short name"):
        predict.load_model_and_tokenizer(parse(["--model_path", str(tmp_path / "nope")]))
    with pytest.raises(predict.CLIError, match=r"is not a model \(no config.json\)"):
        predict.load_model_and_tokenizer(parse(["--model_path", str(tmp_path)]))
    with pytest.raises(predict.CLIError, match="--num_threads 0 must be at least 1"):
        predict.load_model_and_tokenizer(parse(["--model_path", checkpoint, "--num_threads", "0"]))
    if not __import__("importlib").util.find_spec("flash_attn"):
        with pytest.raises(predict.CLIError, match="flash-attn"):
            predict.load_model_and_tokenizer(parse(["--model_path", checkpoint,
                                                    "--attn_implementation", "flash_attention_2"]))


def test_left_padded_batch_rows_equal_single_runs(checkpoint):
    model, tokenizer = predict.load_model_and_tokenizer(parse(["--model_path", checkpoint]))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    prompts = ["The quick brown fox jumps over the lazy dog. " * 12, "Answer the question: who? " * 3]
    for method in ("FullKV", "SnapKV"):
        config = {"max_capacity_prompt": 24, "window_size": 4}
        batch = predict.generate(model, tokenizer, prompts, 12, method, config)
        single = [predict.generate(model, tokenizer, [p], 12, method, config)[0] for p in prompts]
        assert batch == single
        assert all(isinstance(text, str) and text for text in batch)


def test_stop_strings_end_generation_at_the_stop_token(checkpoint):
    import torch
    model, tokenizer = predict.load_model_and_tokenizer(parse(["--model_path", checkpoint]))
    prompt = "Summary: the meeting was about budgets. " * 4
    inputs = tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode():
        free = model.generate(**inputs, max_new_tokens=40, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    free = free.tolist()
    # a token from the middle of the free run that round-trips through text as itself (not at step 0,
    # where min_new_tokens=1 suppresses it)
    stop_at, stop = next((k, tokenizer.decode([t])) for k, t in enumerate(free) if k >= 2
                         and t not in free[:k] and tokenizer.encode(tokenizer.decode([t]),
                                                                    add_special_tokens=False) == [t])
    assert predict.stop_token_ids(tokenizer, [stop]) == [free[stop_at]]
    stopped = predict.generate(model, tokenizer, [prompt], 40, "FullKV", {}, stop_strings=[stop])[0]
    assert stopped == tokenizer.decode(free[:stop_at + 1], skip_special_tokens=True)  # stop token kept
