"""--device_map (accelerate big-model inference, pyramidkv/placement.py): a model split over devices
(here CPU and disk offload; GPUs when there are several) predicts what the one-device model does, and
its compressed cache keeps each layer's K/V on that layer's device."""
from __future__ import annotations

import json
import os

import pytest
import torch

import pyramidkv
import run_ruler
from pyramidkv import placement, predict
from pyramidkv.predict import CLIError
from pyramidkv.sharding import Shard

# 7MB of CPU for the 8.9MB tiny checkpoint: embeddings and layer 0 in memory, layer 1 and the head on disk
SPLIT = ["--device_map", "auto", "--max_memory", "cpu=7MB"]
ARGS = ["--model_path", "tiny", "--context_lengths", "512", "--tasks", "niah_single_1", "--num_samples", "3",
        "--num_threads", "1", "--max_capacity_prompts", "64", "--eval_batch_size", "2"]


def _records(root):
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".json") and name != "run_meta.json":
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found[os.path.relpath(os.path.join(folder, name), root)] = [json.loads(line) for line in f]
    return found


@pytest.mark.parametrize("methods", ["SnapKV", "SnapKV,H2O,FullKV"])  # one generate; one shared prefill
def test_offloaded_model_predicts_what_the_plain_model_does(tmp_path, methods):
    run_ruler.main([*ARGS, "--method", methods, "--save_dir", str(tmp_path / "plain")])
    run_ruler.main([*ARGS, "--method", methods, "--save_dir", str(tmp_path / "split"), *SPLIT,
                    "--offload_folder", str(tmp_path / "offload")])
    plain = _records(tmp_path / "plain")
    assert plain and len(plain) == len(methods.split(","))
    assert _records(tmp_path / "split") == plain
    meta = json.load(open(tmp_path / "split" / "pyramidkv-tiny-llama_64" / "run_meta.json"))["SnapKV"]
    layers = meta["protocol"]["layer_devices"]
    assert layers["model.layers.0"] == "cpu" and layers["model.layers.1"] == "disk"
    assert meta["protocol"]["device_map"] == "auto" and meta["protocol"]["max_memory"] == "cpu=7MB"


def _load(tmp_path, *flags):
    args = run_ruler.build_parser().parse_args(["--model_path", "tiny", *flags])
    return predict.load_model_and_tokenizer(args, Shard())


def _layer_devices(model):
    """The device each decoder layer runs on (accelerate's hook for a placed layer)."""
    devices = []
    for layer in model.model.layers:
        hook = getattr(layer, "_hf_hook", None)
        device = getattr(hook, "execution_device", None) if hook is not None else None
        devices.append(torch.device(device if not isinstance(device, int) else f"cuda:{device}")
                       if device is not None else next(layer.parameters()).device)
    return devices


def _compressed_cache(model, tokenizer, prompts):
    inputs = predict.encode_prompts(model, tokenizer, prompts)
    with torch.inference_mode(), pyramidkv.compress(model, "snapkv", max_capacity_prompt=16, window_size=4):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)
    return out.sequences, out.past_key_values


@pytest.mark.parametrize("memory, placed", [
    ("cpu=7MB", {"model.layers.0": "cpu", "model.layers.1": "disk"}),
    ("cpu=1MB", {"": "disk"}),  # all on disk: model.device is `meta`, inputs still go to the CPU
])
def test_cache_layers_live_on_their_layers_devices(tmp_path, memory, placed):
    model, tokenizer = _load(tmp_path, "--device_map", "auto", "--max_memory", memory,
                             "--offload_folder", str(tmp_path / "offload"))
    assert placed.items() <= model.hf_device_map.items()
    prompts = ["one two three four five six seven eight nine ten eleven twelve " * 4, "a short one " * 5]
    sequences, cache = _compressed_cache(model, tokenizer, prompts)
    for layer, device in zip(cache.layers, _layer_devices(model)):
        assert layer.keys.device == device and layer.values.device == device
        assert layer.filler_slots is None or layer.filler_slots.device == device
    plain, plain_tokenizer = _load(tmp_path)
    assert torch.equal(_compressed_cache(plain, plain_tokenizer, prompts)[0], sequences)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs to split layers across them")
def test_layers_split_across_two_gpus(tmp_path):
    model, tokenizer = _load(tmp_path, "--device_map", "auto", "--max_memory", "0=5MB,1=1GB")
    devices = _layer_devices(model)
    assert len(set(devices)) == 2, devices
    prompts = ["one two three four five six seven eight nine ten eleven twelve " * 4, "a short one " * 5]
    sequences, cache = _compressed_cache(model, tokenizer, prompts)  # padded batch: per-row masks per device
    for layer, device in zip(cache.layers, devices):
        assert layer.keys.device == device
    plain, plain_tokenizer = _load(tmp_path, "--device", "cuda")
    assert torch.equal(_compressed_cache(plain, plain_tokenizer, prompts)[0].cpu(), sequences.cpu())


@pytest.mark.parametrize("flags, message", [
    (["--max_memory", "cpu=1GB"], "--max_memory only applies with --device_map"),
    (["--offload_folder", "x"], "--offload_folder only applies with --device_map"),
    (["--device_map", "auto", "--max_memory", "cpu:1GB"], "'cpu:1GB' is not DEVICE=AMOUNT"),
    (["--device_map", "auto", "--max_memory", "gpu0=1GB"], "device 'gpu0' is not a GPU index"),
    (["--device_map", "auto", "--max_memory", "cpu=lots"], "is not DEVICE=AMOUNT"),
    (["--device_map", "auto", "--device", "cpu"], "--device cpu conflicts"),
])
def test_placement_flag_errors_are_one_line(flags, message):
    args = run_ruler.build_parser().parse_args(["--model_path", "tiny", *flags])
    with pytest.raises(CLIError, match=message.replace("(", r"\(")) as err:
        placement.validate_placement(args, Shard())
    assert "\n" not in str(err.value)


def test_placement_refuses_a_gpu_it_does_not_see_and_shards_sharing_a_machine():
    args = run_ruler.build_parser().parse_args(
        ["--model_path", "tiny", "--device_map", "auto", "--max_memory", f"{torch.cuda.device_count()}=1GB"])
    with pytest.raises(CLIError, match="names GPU"):
        placement.validate_placement(args, Shard())
    args = run_ruler.build_parser().parse_args(["--model_path", "tiny", "--device_map", "auto"])
    with pytest.raises(CLIError, match="2 processes on one machine"):
        placement.validate_placement(args, Shard(1, 2, 1, 2))
    assert placement.parse_max_memory("0=20GiB, cpu = 64GiB") == {0: "20GiB", "cpu": "64GiB"}


@pytest.mark.parametrize("patch", ["replace_llama", "replace"])  # one family / every family at once
def test_patch_after_loading_reaches_a_hooked_base_model(tmp_path, patch):
    """A device_map that hooks the base model itself (accelerate keeps the forward it had when hooked):
    replace_llama after loading must still compress, and restore() must stop it."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.join(os.path.dirname(__file__), "..", "ckpt", "pyramidkv-tiny-llama"),
                                                 device_map={"model": "cpu", "lm_head": "disk"},
                                                 offload_folder=str(tmp_path / "offload"))
    assert hasattr(model.model, "_hf_hook")  # the case under test
    ids = torch.randint(3, 90, (1, 200), generator=torch.Generator().manual_seed(0))
    generate = lambda: model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)  # noqa: E731
    getattr(pyramidkv, patch)("snapkv", max_capacity_prompt=64)
    cache = generate().past_key_values
    assert isinstance(cache, pyramidkv.CompressedCache) and cache.kept_tokens() == [64, 64]
    pyramidkv.restore()
    assert not isinstance(generate().past_key_values, pyramidkv.CompressedCache)
