"""Runner flags for method parameters come from the method dataclasses; ratio budgets reach the runners
and name their results directories (issue 18)."""
import argparse
import dataclasses
import os

import pytest

import pyramidkv
import run_ruler
from pyramidkv import method_flags, predict
from tiny_checkpoint import build_tiny_checkpoint, one_torch_thread

_single_thread = pytest.fixture(autouse=True)(one_torch_thread)


def parse(argv, sweep=False):
    parser = argparse.ArgumentParser()
    predict.add_common_args(parser, sweep=sweep)
    return parser.parse_args(argv)


def config(argv):
    args = parse(argv)
    predict.validate_method_args(args)
    return predict.method_config(args), predict.budget_name(args)


def test_every_field_of_every_registered_method_has_a_flag():
    flags = {field.name for field in method_flags.method_fields()} | set(method_flags.HAND_WRITTEN)
    for cls in pyramidkv.METHODS.values():
        missing = {f.name for f in dataclasses.fields(cls)} - flags
        assert not missing, f"{cls.__name__}: no runner flag for {sorted(missing)}"
    parser = argparse.ArgumentParser()
    predict.add_common_args(parser)
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--beta", "--sink_size", "--skip_layers", "--sim_threshold", "--calibration", "--merge_window",
            "--method_seed", "--compress_ratio", "--keep_ratio", "--heavy_hitter_size", "--fix_kv_size"} <= options


def test_only_method_settings_become_flags():
    """The methods' input/result records (PrefillInputs, Eviction, ...) are dataclasses of tensors, not
    settings: none of their fields may appear as a runner flag."""
    fields = {field.name for field in method_flags.method_fields()}
    settings = {f.name for cls in pyramidkv.METHODS.values() for f in dataclasses.fields(cls)}
    assert fields <= settings and {"query", "padding_mask", "evicted_keys", "layer_idx"}.isdisjoint(fields)


def test_method_parameters_reach_the_method():
    assert config(["--method", "PyramidKV", "--beta", "10"])[0]["beta"] == 10
    assert config(["--method", "StreamingLLM", "--sink_size", "2"])[0]["sink_size"] == 2
    assert config(["--method", "L2Norm", "--skip_layers", "1"])[0]["skip_layers"] == 1
    simcal, name = config(["--method", "simcalkv", "--compress_ratio", "0.4", "--sim_threshold", "0.8",
                           "--calibration", "released"])
    assert simcal == {"window_size": 8, "kernel_size": 7, "pooling": "maxpool", "compress_ratio": 0.4,
                      "sim_threshold": 0.8, "calibration": "released"} and name == "compress0.4"
    assert config(["--method", "CaM", "--method_seed", "3", "--merge_window", "4"])[0]["seed"] == 3
    assert config(["--method", "ChunkKV", "--shared_heads", "false"])[0]["shared_heads"] is False
    with pytest.raises(predict.CLIError, match="sim_threshold=1.5"):
        config(["--method", "simcalkv", "--sim_threshold", "1.5"])
    with pytest.raises(predict.CLIError, match="unknown config"):
        config(["--method", "SnapKV", "--sim_threshold", "0.5"])  # a method refuses what it does not have


def test_ratio_budgets_and_directory_names():
    assert config([])[1] == "128" and config(["--max_capacity_prompts", "64"])[1] == "64"  # unchanged
    assert config(["--method", "SnapKV", "--keep_ratio", "0.25"]) == (
        {"window_size": 8, "kernel_size": 7, "pooling": "maxpool", "keep_ratio": 0.25}, "keep0.25")
    with pytest.raises(predict.CLIError, match="give one budget only"):
        config(["--method", "SnapKV", "--keep_ratio", "0.25", "--max_capacity_prompts", "64"])
    with pytest.raises(predict.CLIError, match="between 0 and 1"):
        config(["--method", "SnapKV", "--compress_ratio", "1.2"])
    # CS3602 methods size their own cache: no window or budget flags unless given, one directory name
    assert config(["--method", "h2o_l2", "--heavy_hitter_size", "32"]) == ({"heavy_hitter_size": 32}, "own")
    assert config(["--method", "recent_only", "--window_size", "64"]) == ({"window_size": 64}, "own")
    with pytest.raises(predict.CLIError, match="keep_ratio=0.5 is not used by h2o_l2"):
        config(["--method", "h2o_l2", "--keep_ratio", "0.5"])  # refused, not silently ignored
    assert config(["--method", "fix_size_l2", "--keep_ratio", "0.2"])[0] == {"keep_ratio": 0.2}  # its own share
    with pytest.raises(predict.CLIError, match="max_capacity_prompt=64 is not used by h2o_l2"):
        config(["--method", "h2o_l2", "--max_capacity_prompts", "64"])


def test_sweep_keeps_the_budget_default_marker():
    args = parse(["--method", "SnapKV,H2O", "--compress_ratio", "0.5"], sweep=True)
    runs = predict.expand_sweep(args)
    assert [predict.budget_name(run) for run in runs] == ["compress0.5", "compress0.5"]
    assert all("max_capacity_prompt" not in predict.method_config(run) for run in runs)


def test_run_ruler_with_a_ratio_writes_its_own_directory(tmp_path, monkeypatch):
    checkpoint = build_tiny_checkpoint(str(tmp_path / "ckpt" / "tiny-llama"))
    monkeypatch.setattr(predict, "generate", lambda model, tok, prompts, *a, **k: ["x"] * len(prompts))
    argv = ["--method", "SimCalKV", "--compress_ratio", "0.4", "--model_path", checkpoint, "--save_dir",
            str(tmp_path), "--context_lengths", "1024", "--tasks", "niah_single_1", "--num_samples", "1"]
    assert predict.run_cli(run_ruler.main, argv) == 0
    assert os.path.isdir(tmp_path / "tiny-llama_compress0.4" / "1024" / "niah_single_1")


def test_sweep_over_kept_fractions():
    args = parse(["--method", "FullKV,SnapKV,h2o_l2", "--keep_ratio", "0.1,0.25,0.5"], sweep=True)
    runs = predict.expand_sweep(args)
    names = [(run.method, predict.budget_name(run)) for run in runs]
    assert names == [("FullKV", "keep0.1"), ("SnapKV", "keep0.1"), ("h2o_l2", "own"), ("SnapKV", "keep0.25"),
                     ("SnapKV", "keep0.5")]  # FullKV and self-sized methods once
    assert [run.keep_ratio for run in runs if run.method == "SnapKV"] == [0.1, 0.25, 0.5]
    for run in runs:
        predict.validate_method_args(run)  # h2o_l2 does not get the sweep's keep_ratio
    with pytest.raises(predict.CLIError, match="not a number"):
        predict.expand_sweep(parse(["--method", "SnapKV", "--keep_ratio", "0.1,x"], sweep=True))
    with pytest.raises(predict.CLIError, match="give one budget only"):
        predict.expand_sweep(parse(["--method", "SnapKV", "--keep_ratio", "0.1", "--compress_ratio", "0.5"],
                                   sweep=True))


def test_a_self_sized_method_neither_takes_nor_drops_a_swept_ratio():
    """h2o_l2 first must not strip the ratio of the methods after it (it once ran them at the default
    128 tokens); l2_compress's own keep_ratio is swept, one directory per value."""
    args = parse(["--method", "h2o_l2,SnapKV,l2_compress", "--keep_ratio", "0.1,0.5"], sweep=True)
    runs = predict.expand_sweep(args)
    assert [(run.method, predict.budget_name(run), run.keep_ratio) for run in runs] == [
        ("h2o_l2", "own", None), ("SnapKV", "keep0.1", 0.1), ("l2_compress", "own_keep0.1", 0.1),
        ("SnapKV", "keep0.5", 0.5), ("l2_compress", "own_keep0.5", 0.5)]
    assert [predict.method_config(run).get("keep_ratio") for run in runs] == [None, 0.1, 0.1, 0.5, 0.5]


def test_a_sweep_gives_each_method_only_its_own_parameters():
    args = parse(["--method", "fix_size_l2,h2o_l2,SnapKV", "--fix_kv_size", "400", "--heavy_hitter_size", "48"],
                 sweep=True)
    runs = predict.expand_sweep(args)
    for run in runs:
        predict.validate_method_args(run)
    configs = {run.method: predict.method_config(run) for run in runs}
    assert configs["fix_size_l2"] == {"fix_kv_size": 400} and configs["h2o_l2"] == {"heavy_hitter_size": 48}
    assert configs["SnapKV"]["max_capacity_prompt"] == 128 and "fix_kv_size" not in configs["SnapKV"]
    with pytest.raises(predict.CLIError, match="--fix_kv_size is a parameter of none of SnapKV, H2O"):
        predict.expand_sweep(parse(["--method", "SnapKV,H2O", "--fix_kv_size", "3"], sweep=True))
    one = predict.expand_sweep(parse(["--method", "SnapKV", "--fix_kv_size", "3"], sweep=True))
    with pytest.raises(predict.CLIError, match="unknown config"):  # one method alone: its own strict check
        predict.validate_method_args(one[0])


def test_commonkv_with_eviction_gets_its_own_results_directory():
    """CommonKV + --evict_method must not share {model}_{budget} with a CommonKV run keeping every latent
    (the settings check would refuse the second one instead of storing both)."""
    _, plain = config(["--method", "CommonKV", "--max_capacity_prompts", "64"])
    _, evicting = config(["--method", "CommonKV", "--evict_method", "snapkv", "--max_capacity_prompts", "64"])
    assert plain == "64" and evicting == "64_evictSnapKV"
    _, quantized = config(["--method", "CommonKV", "--evict_method", "SnapKV", "--max_capacity_prompts", "64",
                           "--quant_method", "kivi", "--nbits", "4"])
    assert quantized == "64_evictSnapKV_kivi4"
    _, whitened = config(["--method", "CommonKV", "--factorization", "whitened", "--max_capacity_prompts", "64"])
    assert whitened == "64_whitened"
