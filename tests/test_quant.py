"""KIVI quantization storage (pyramidkv/quant.py): codes, error bound, bytes, logits, batches, errors."""

import argparse

import pytest
import torch

import pyramidkv
from pyramidkv.method_flags import budget_name
from pyramidkv.commonkv_quant import QuantLatentLayer
from pyramidkv.quant import QuantizedLayer, pack, unpack, unpack_as
from conftest import greedy, load_script, prompt, tiny_model

# the tiny models have head_dim 16: groups of 8 channels / tokens
QUANT = {"quant_method": "kivi", "group_size": 8, "residual_length": 16}


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_pack_unpack_roundtrip(nbits):
    codes = torch.randint(0, 2 ** nbits, (3, 5, 16), dtype=torch.uint8)
    packed = pack(codes, nbits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 16 * nbits // 8
    assert torch.equal(unpack(packed, nbits), codes)
    assert torch.equal(unpack_as(packed, nbits, torch.float32), codes.float())  # the table lookup attention reads


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_dequantization_error_within_half_a_step_per_group(nbits):
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 32, 16) * 3, torch.randn(1, 2, 32, 16)
    layer = QuantizedLayer(nbits, group_size=8, full_precision=0)
    layer.update(keys, values)
    layer.store_compressed(keys, values, [32], [32])
    assert layer.rows[0].residual_keys.shape[1] == 0  # everything quantized
    levels = 2 ** nbits - 1
    key_groups = keys.reshape(1, 2, 4, 8, 16)  # per channel, over groups of 8 tokens
    key_step = (key_groups.amax(3, keepdim=True) - key_groups.amin(3, keepdim=True)) / levels
    key_error = (layer.keys - keys).abs().reshape(1, 2, 4, 8, 16)
    assert bool((key_error <= key_step / 2 * (1 + 1e-4) + 1e-6).all())
    value_groups = values.reshape(1, 2, 32, 2, 8)  # per token, over groups of 8 channels
    value_step = (value_groups.amax(4, keepdim=True) - value_groups.amin(4, keepdim=True)) / levels
    value_error = (layer.values - values).abs().reshape(1, 2, 32, 2, 8)
    assert bool((value_error <= value_step / 2 * (1 + 1e-4) + 1e-6).all())
    assert key_error.max() > 0  # it really was quantized


def _expected_bytes(tokens, batch, heads, dim, nbits, group, full_precision, element=4):
    quantized = max(0, (tokens - full_precision) // group) * group
    residual = tokens - quantized
    codes = 2 * quantized * dim * nbits // 8  # keys + values
    key_stats = 2 * (quantized // group) * dim * element  # min + scale per channel and token group
    value_stats = 2 * quantized * (dim // group) * element  # min + scale per token and channel group
    return batch * heads * (codes + key_stats + value_stats + 2 * residual * dim * element)


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_nbytes_formula_exact_after_prefill_and_decoding(nbits):
    model = tiny_model()
    with torch.no_grad(), pyramidkv.compress(model, "snapkv", max_capacity_prompt=40, nbits=nbits, **QUANT):
        out = greedy(model, prompt(90), new_tokens=13)
    cache = out.past_key_values
    # 40 kept + 12 decoded tokens stored (the last new token is not fed back)
    per_layer = _expected_bytes(52, 1, 2, 16, nbits, 8, 16)
    assert cache.nbytes() == 3 * per_layer
    dense = 3 * 2 * 2 * 52 * 16 * 4
    assert cache.nbytes() < dense


def test_decode_flushes_residual_one_group_at_a_time():
    keys, values = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    layer = QuantizedLayer(4, group_size=8, full_precision=10)
    layer.update(keys, values)
    layer.store_compressed(keys, values, [20], [20])
    seen = []
    for _ in range(10):
        row = layer.rows[0]
        seen.append((row.key_codes.shape[1], row.residual_keys.shape[1]))
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    # residual grows to full_precision + group_size - 1 = 17, then 8 tokens are quantized at once
    assert seen == [(8, 12), (8, 13), (8, 14), (8, 15), (8, 16), (8, 17), (16, 10), (16, 11), (16, 12), (16, 13)]
    assert layer.physical_length == 30 and layer.keys.shape == (1, 2, 30, 16)


@pytest.mark.parametrize("method,config", [("fullkv", {}), ("snapkv", {"max_capacity_prompt": 48})])
def test_8bit_logits_match_unquantized_within_1e_2(method, config):
    model = tiny_model()
    ids = prompt(100)
    with torch.no_grad(), pyramidkv.compress(model, method, **config):
        reference = greedy(model, ids, new_tokens=30)
    errors = {}
    for nbits in (8, 2):
        with torch.no_grad(), pyramidkv.compress(model, method, **config, nbits=nbits, **QUANT):
            out = greedy(model, ids, new_tokens=30)
        steps = [(a, b) for a, b in zip(out.logits, reference.logits)][:10]  # before any divergence at 2 bits
        errors[nbits] = max(float((a - b).abs().max() / b.abs().max()) for a, b in steps)
        if nbits == 8:
            assert torch.equal(out.sequences, reference.sequences)
            assert max(float((a - b).abs().max() / b.abs().max())
                       for a, b in zip(out.logits, reference.logits)) < 1e-2
    assert errors[2] > errors[8]  # the comparison sees the quantization


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_rows_equal_their_single_runs(attn):
    model = tiny_model(attn=attn)
    lengths = (70, 45)
    singles = [prompt(n, seed=3 + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, single in enumerate(singles):
        ids[row, width - single.shape[1]:], mask[row, width - single.shape[1]:] = single[0], 1
    config = {"max_capacity_prompt": 32, "nbits": 4, **QUANT}
    with torch.no_grad(), pyramidkv.compress(model, "snapkv", **config):
        batch = greedy(model, ids, new_tokens=20, attention_mask=mask)
        for row, single in enumerate(singles):
            alone = greedy(model, single, new_tokens=20)
            assert torch.equal(batch.sequences[row, width:], alone.sequences[0, single.shape[1]:])
            for step_batch, step_alone in zip(batch.logits, alone.logits):
                assert torch.allclose(step_batch[row], step_alone[0], atol=1e-3, rtol=1e-3)
    kept = batch.past_key_values.layers[0].rows
    assert [row.tokens for row in kept] == [32 + 19, 32 + 19]  # fillers are not stored


def test_batch_reshuffles_move_whole_rows():
    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 30, 16), torch.randn(3, 2, 30, 16)
    layer = QuantizedLayer(4, group_size=8, full_precision=10)
    layer.update(keys, values)
    layer.store_compressed(keys, values, [30, 30, 30], [30, 30, 30])
    view_keys, view_values = layer.keys, layer.values
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.keys, view_keys[[2, 0, 0]]) and torch.equal(layer.values, view_values[[2, 0, 0]])
    shared = layer.nbytes()
    layer.batch_select_indices(torch.tensor([0, 1]))
    assert torch.equal(layer.keys, view_keys[[2, 0]])
    assert layer.nbytes() == shared  # rows 0 and 2 shared storage after the reorder: counted once
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, view_keys[[2, 2, 0, 0]])
    layer.update(torch.randn(4, 2, 1, 16), torch.randn(4, 2, 1, 16))  # appends copy: no row changes another
    assert torch.equal(layer.keys[:, :, :30], view_keys[[2, 2, 0, 0]])


def test_beam_search_runs_on_quantized_rows():
    model = tiny_model()
    ids = prompt(60)
    kwargs = {"num_beams": 3, "max_new_tokens": 12, "do_sample": False}
    with torch.no_grad(), pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        reference = model.generate(ids, **kwargs)
    # beams of this model are within 0.01 in score, so quantization noise may pick others: a residual longer
    # than the cache (nothing quantized) must give exactly the dense beams, and a short one must run
    long_residual = {**QUANT, "residual_length": 100}
    with torch.no_grad(), pyramidkv.compress(model, "snapkv", max_capacity_prompt=32, nbits=4, **long_residual):
        assert torch.equal(model.generate(ids, **kwargs), reference)
    with torch.no_grad(), pyramidkv.compress(model, "snapkv", max_capacity_prompt=32, nbits=4, **QUANT):
        assert model.generate(ids, **kwargs).shape == reference.shape


def test_quantization_off_keeps_the_dense_layer():
    model = tiny_model()
    with torch.no_grad(), pyramidkv.compress(model, "snapkv", max_capacity_prompt=32):
        out = greedy(model, prompt(60), new_tokens=3)
    assert not any(isinstance(layer, QuantizedLayer) for layer in out.past_key_values.layers)


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "hqq"}, "quant_method='hqq' is unknown; valid choices: none, kivi"),
    ({"quant_method": "kivi", "nbits": 3}, "nbits=3 is invalid; valid choices: 2, 4, 8"),
    ({"quant_method": "kivi", "group_size": 0}, "group_size=0 is invalid"),
    ({"quant_method": "kivi", "residual_length": -1}, "residual_length=-1 is invalid"),
    ({"quant_method": "kivi", "max_cache_size": 64}, "cannot be combined with decode-time eviction"),
])
def test_bad_settings_are_one_line_errors(config, message):
    method = "h2o" if "max_cache_size" in config else "snapkv"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        pyramidkv.build_method(method, **config)
    assert "\n" not in str(err.value)


def test_group_size_not_dividing_head_dim_is_an_error():
    model = tiny_model()  # head_dim 16
    with pytest.raises(ValueError, match="group_size=32 does not divide head_dim=16"):
        with torch.no_grad(), pyramidkv.compress(model, "snapkv", quant_method="kivi"):
            greedy(model, prompt(60), new_tokens=2)


def test_results_directory_names_the_quantization():
    args = argparse.Namespace(method="SnapKV", max_capacity_prompts=128, quant_method="kivi", nbits=2,
                              group_size=None, residual_length=None)
    assert budget_name(args) == "128_kivi2"
    args.group_size, args.residual_length = 64, 16
    assert budget_name(args) == "128_kivi2_g64_r16"
    args.quant_method = None
    assert budget_name(args) == "128"


def test_eval_scripts_pass_the_quantization_through(tmp_path):
    import json
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TASKS="niah_single_1", NUM_SAMPLES="1", CONTEXT_LENGTHS="512", QUANT_METHOD="kivi",
               NBITS="2", RESIDUAL_LENGTH="16")
    proc = subprocess.run(["sh", os.path.join(root, "scripts", "scripts_ruler", "eval.sh"), "0", "SnapKV", "48",
                           "sdpa", str(tmp_path), "tiny"], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results_dir = tmp_path / "results_ruler" / "pyramidkv-tiny-llama_48_kivi2_r16"
    assert list(json.loads((results_dir / "results.json").read_text())["SnapKV"]) == ["512"]
    run_args = json.loads((results_dir / "run_meta.json").read_text())["SnapKV"]["args"]
    assert (run_args["quant_method"], run_args["nbits"], run_args["residual_length"]) == ("kivi", 2, 16)


def test_quant_report_writes_bytes_errors_and_tpot(tmp_path):
    import json
    import os
    report = load_script("quant_report")
    scores = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "perhead",
                          "tiny_headkv_scores.json")
    assert report.main(["--context", "160", "--budgets", "64", "--nbits", "8,2", "--new_tokens", "3",
                        "--scores_file", scores, "--out_dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "quant_tiny_160.json").read_text())["rows"]
    assert [(r["method"], r["nbits"]) for r in rows] == [("FullKV", 32), ("FullKV", 8), ("FullKV", 2),
                                                         ("SnapKV", 32), ("SnapKV", 8), ("SnapKV", 2),
                                                         ("AdaKV", 32), ("HeadKV", 32)]
    for dense, eight, two in (rows[:3], rows[3:6]):
        assert dense["max_rel_logit_error"] == 0 and two["kv_bytes"] < eight["kv_bytes"] < dense["kv_bytes"]
        assert 0 < eight["max_rel_logit_error"] < two["max_rel_logit_error"]
    for per_head in rows[6:]:  # after prefill: SnapKV's total, plus the per-head index (< 1%)
        assert rows[3]["kv_bytes_after_prefill"] < per_head["kv_bytes_after_prefill"]
        assert per_head["kv_bytes_after_prefill"] < 1.01 * rows[3]["kv_bytes_after_prefill"]
    assert (tmp_path / "quant_tiny_160_memory_vs_budget.png").exists()


def test_quant_report_rejects_an_unknown_perhead_method(capsys):
    report = load_script("quant_report")
    with pytest.raises(SystemExit) as exit_info:
        report.parse_args(["--perhead", "SnapKV"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'SnapKV'" in err and "AdaKV" in err


def test_quant_report_refuses_headkv_scores_of_another_model_before_measuring(capsys, monkeypatch):
    report = load_script("quant_report")
    runs = []
    monkeypatch.setattr(report, "run_variants", lambda *a, **k: runs.append(a))
    assert report.main(["--context", "160", "--budgets", "64", "--nbits", "8", "--new_tokens", "2"]) == 2
    assert "scores_file=" in capsys.readouterr().err and runs == []  # SmolLM2's default file on the tiny model


def test_every_method_composes_with_8bit_quantization():
    model = tiny_model()
    ids = prompt(80)
    checked = []
    for name in pyramidkv.list_methods():
        config = {} if pyramidkv.METHODS[name].sizes_own_cache else {"max_capacity_prompt": 40}
        try:
            pyramidkv.build_method(name, **config, nbits=8, **QUANT)
        except ValueError as err:  # a storage that cannot be quantized yet says so in one line
            assert "quant_method" in str(err) and "\n" not in str(err)
            continue
        try:
            with torch.no_grad(), pyramidkv.compress(model, name, **config):
                reference = greedy(model, ids, new_tokens=8)
        except ValueError:
            continue  # needs settings this model cannot give (HeadKV's scores file of another model)
        with torch.no_grad(), pyramidkv.compress(model, name, **config, nbits=8, **QUANT):
            out = greedy(model, ids, new_tokens=8)
        assert isinstance(out.past_key_values.layers[-1], (QuantizedLayer, QuantLatentLayer)), name  # CommonKV: latents
        assert torch.equal(out.sequences, reference.sequences), name
        assert out.past_key_values.nbytes() < reference.past_key_values.nbytes(), name
        checked.append(name)
    assert {"FullKV", "SnapKV", "PyramidKV", "H2O", "SimCalKV", "CaM"} <= set(checked)
