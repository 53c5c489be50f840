"""CommonKV factorization="whitened" (pyramidkv/commonkv_factors.py): exact at full rank, a lower error on
the calibration activations than the weight SVD at the same rank, "weights" unchanged, its own cache
entries, one-line errors."""

import pytest
import torch

import pyramidkv
from pyramidkv import commonkv
from pyramidkv import commonkv_factors as cf
from pyramidkv.methods import build_method

from conftest import assert_same_generation, greedy, load_script, prompt, tiny_model

CALIB = {"factorization": "whitened", "calibration_tokens": 96}


@pytest.fixture(autouse=True)
def factor_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(commonkv, "CACHE_DIR", tmp_path / "commonkv")
    commonkv._MEMORY.clear()


def _anisotropic(model, seed=5):
    # real models' attention inputs have a few large channels (input_layernorm weights): random ones are
    # nearly isotropic, where whitening could not help
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            norm = layer.input_layernorm.weight
            norm.copy_(torch.exp(1.5 * torch.randn(norm.shape, generator=generator)))
    return model


def _stacked(attn):
    return torch.cat([attn.k_proj.weight, attn.v_proj.weight]).detach()


@pytest.mark.parametrize("family, layer_step, kv_heads", [
    ("llama", 2, 2),  # groups [0, 1] (rank 64 = hidden) and [2] (2 x 32 = 64)
    ("mistral", 2, 2),
    ("llama", 1, 1),  # K+V = 32 < hidden 64: full rank = rank(W), the whitened SVD must still be exact
])
def test_whitened_full_rank_equals_fullkv(family, layer_step, kv_heads):
    model = _anisotropic(tiny_model(family, seed=3 if family == "mistral" else 0, layers=3, kv_heads=kv_heads))
    ids = prompt(24)
    ref = greedy(model, ids)
    with pyramidkv.compress(model, "commonkv", layer_step=layer_step, **CALIB):
        out = greedy(model, ids)
    assert_same_generation(ref, out)


def test_grams_are_the_k_proj_inputs():
    model = tiny_model(layers=2)
    method = build_method("commonkv", layer_step=2, **CALIB)
    attns = [layer.self_attn for layer in model.model.layers]
    grams = cf.attention_grams(model.model, method, attns)
    ids, _ = cf.calibration_ids(model.model, method)
    assert ids.shape == (1, 96) and int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[0].double()
    assert torch.allclose(grams[0], x.T @ x / 96, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(grams[0], grams[1], rtol=1e-2)  # each layer its own inputs


def test_whitened_low_rank_beats_weight_svd_on_calibration_activations():
    model = _anisotropic(tiny_model(layers=4))
    attns = [layer.self_attn for layer in model.model.layers]
    for rank in (4, 8, 16):
        errors = {}
        for factorization in ("weights", "whitened"):
            method = build_method("commonkv", layer_step=2, rank=rank, factorization=factorization,
                                  calibration_tokens=96)
            grams = cf.attention_grams(model.model, method, attns)
            factors = commonkv.compute_factors(model.model, method)
            errors[factorization] = sum(
                cf.activation_error(_stacked(attn), factors["A"][i], torch.cat([factors["Uk"][i], factors["Uv"][i]]),
                                    grams[i]) for i, attn in enumerate(attns))
        assert errors["whitened"] < 0.8 * errors["weights"], (rank, errors)


def test_whitened_steps_are_optimal_for_their_objectives():
    # step 1 (no refit): the Eckart-Young optimum of the pooled objective sum_l tr(D_l G D_l^T), G = mean G_l,
    # so no rank-r factorization (the weight SVD's, a random A with its least-squares U) does better;
    # step 2 (refit): each layer's own error never above step 1's
    model = _anisotropic(tiny_model(layers=2))
    attns = [layer.self_attn for layer in model.model.layers]
    grams = cf.attention_grams(model.model, build_method("commonkv", layer_step=2, **CALIB), attns)
    weights = [_stacked(attn) for attn in attns]
    pooled = sum(grams) / 2

    def errors(factors, gram_of):
        return [cf.activation_error(w, a, up, gram_of(i)) for i, (w, (a, up)) in enumerate(zip(weights, factors))]

    for rank in (4, 8, 16):
        step1 = cf.factor_group(weights, [rank] * 2, grams, refit=False)
        step2 = cf.factor_group(weights, [rank] * 2, grams)
        plain = cf.factor_group(weights, [rank] * 2, None)
        best = sum(errors(step1, lambda i: pooled))
        assert best < 0.8 * sum(errors(plain, lambda i: pooled)), rank
        a = torch.randn(rank, 64, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        stacked = torch.cat(weights).double()
        up = torch.linalg.solve(a @ pooled @ a.T, a @ pooled @ stacked.T).T
        assert best <= sum(errors([(a, up[:64]), (a, up[64:])], lambda i: pooled)) * (1 + 1e-6)
        for own, refit in zip(errors(step1, lambda i: grams[i]), errors(step2, lambda i: grams[i])):
            assert refit <= own * (1 + 1e-6)
        assert all(torch.equal(x[0], y[0]) for x, y in zip(step1, step2))  # the refit changes U only


def test_weights_factorization_is_the_plain_svd_bit_for_bit():
    model = tiny_model(layers=3)
    factors = commonkv.compute_factors(model.model, build_method("commonkv", layer_step=2, rank=8))
    attns = [layer.self_attn for layer in model.model.layers]
    u, s, vh = torch.linalg.svd(torch.cat([_stacked(attns[0]).float(), _stacked(attns[1]).float()]),
                                full_matrices=False)
    up = u * s
    assert torch.equal(factors["A"][1], vh[:8])
    assert torch.equal(factors["Uk"][1], up[64:96, :8]) and torch.equal(factors["Uv"][1], up[96:, :8])


def test_cache_keys_differ_by_factorization_and_calibration(tmp_path):
    model = tiny_model(layers=3)
    other = tmp_path / "other.txt"
    other.write_text("a different calibration text " * 20)

    def key(**config):
        method = build_method("commonkv", layer_step=2, rank=8, **config)
        return commonkv._fingerprint(model.model, method, commonkv.layer_ranks(method, model.model))

    plain = key()
    assert plain == key(calibration_tokens=32)  # unused by "weights": its keys stay as they were
    keys = {plain, key(**CALIB), key(factorization="whitened", calibration_tokens=32),
            key(factorization="whitened", calibration_tokens=96, calibration_file=str(other))}
    assert len(keys) == 4
    before = commonkv.SVD_CALLS[0]
    for factorization in ("weights", "whitened", "weights", "whitened"):
        commonkv._MEMORY.clear()
        commonkv.compute_factors(model.model, build_method("commonkv", layer_step=2, rank=8,
                                                           factorization=factorization, calibration_tokens=96))
    assert commonkv.SVD_CALLS[0] == before + 4  # 2 groups x 2 factorizations, the repeats load from disk
    assert len(list(commonkv.CACHE_DIR.glob("*.pt"))) == 2


@pytest.mark.parametrize("config, message", [
    ({"factorization": "svd"}, "factorization='svd' is unknown; valid choices: weights, whitened"),
    ({"factorization": "whitened", "calibration_tokens": 0}, "calibration_tokens=0 is invalid: it must be a positive"),
    ({"calibration_tokens": 2.5}, "calibration_tokens=2.5 is invalid"),
    ({"factorization": "whitened", "calibration_file": "/no/such/file.txt"},
     "calibration_file='/no/such/file.txt' is not a file; valid choices: a text file, or None"),
])
def test_bad_calibration_config_one_line(config, message):
    with pytest.raises(ValueError, match=message) as info:
        build_method("commonkv", **config)
    assert "\n" not in str(info.value)


def test_unloadable_tokenizer_is_a_one_line_error(tmp_path):
    model = tiny_model(layers=2)
    model.config._name_or_path = str(tmp_path / "no_model_here")
    with pytest.raises(ValueError, match="cannot load the tokenizer of") as info:
        with pyramidkv.compress(model, "commonkv", layer_step=2, **CALIB):
            model(prompt(8))
    assert "\n" not in str(info.value)


def test_report_script_whitened_on_the_embedded_checkpoint(tmp_path):
    # a saved model: the calibration text goes through its own tokenizer (from config._name_or_path)
    import json

    from pyramidkv.models import TINY_CHECKPOINT

    commonkv_report = load_script("commonkv_report")
    out = tmp_path / "report.json"
    assert commonkv_report.main(["--model", "tiny", "--tokens", "48", "--layer_steps", "2", "--ranks", "16,256",
                                 "--decode_steps", "1", "--factorization", "whitened", "--calibration_tokens", "64",
                                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert payload["factorization"] == "whitened" and [r["rank"] for r in rows[1:]] == [16, 256]
    assert all(r["factorization"] == "whitened" and r["calibration_tokens"] == 64 for r in rows[1:])
    assert rows[2]["max_rel_logit_diff"] < 1e-4 and rows[1]["max_rel_logit_diff"] > 1e-3  # 256 = full rank
    from transformers import AutoTokenizer

    method = build_method("commonkv", factorization="whitened", calibration_tokens=64)
    config = type("Config", (), {"_name_or_path": TINY_CHECKPOINT, "vocab_size": 2148})()
    ids, _ = cf.calibration_ids(type("Model", (), {"config": config})(), method)
    expected = AutoTokenizer.from_pretrained(TINY_CHECKPOINT)(cf.DEFAULT_CALIBRATION.read_text()).input_ids[:64]
    assert ids[0].tolist() == expected


def _report_error(monkeypatch, capsys, argv) -> str:
    """commonkv_report.main(argv) exits 2 without loading a model; returns its stderr."""
    loads = []
    monkeypatch.setattr("pyramidkv.models.load_pretrained", lambda *a, **k: loads.append(a))
    assert load_script("commonkv_report").main(["--model", "tiny", *argv]) == 2
    assert loads == []
    return capsys.readouterr().err


def test_report_script_refuses_bad_factorization_before_loading(monkeypatch, capsys):
    assert "factorization='svd' is unknown; valid choices: weights, whitened" in _report_error(
        monkeypatch, capsys, ["--factorization", "svd"])


def test_report_script_variants_bytes_and_unchanged_prefill_nll(tmp_path):
    # merge and eviction act after each layer's prefill attention: bytes shrink, the teacher-forced NLL stays
    import json

    commonkv_report = load_script("commonkv_report")
    out = tmp_path / "variants.json"
    assert commonkv_report.main(["--model", "tiny", "--tokens", "300", "--layer_steps", "2", "--ranks", "64",
                                 "--decode_steps", "1", "--variants", "none,merge,snapkv128,snapkv128+kivi4",
                                 "--controls", "snapkv128", "--out", str(out)]) == 0
    full, *rows, control = json.loads(out.read_text())["rows"]
    # tokens x KV heads x head_dim x (K, V) x fp32 x layers
    assert control["method"] == "SnapKV" and control["nbytes"] == 128 * 2 * 32 * 2 * 4 * 2
    by_name = {r["variant"]: r for r in rows}
    assert by_name["none"]["nbytes"] == 300 * 64 * 4 * 2  # tokens x rank x fp32 x 2 layers
    assert by_name["snapkv128"]["nbytes"] == 128 * 64 * 4 * 2
    assert by_name["merge"]["merge"] is True and by_name["merge"]["nbytes"] < by_name["none"]["nbytes"]
    assert by_name["snapkv128+kivi4"]["nbytes"] < by_name["snapkv128"]["nbytes"]
    assert len({r["nll"] for r in rows}) == 1 and full["nll"] != rows[0]["nll"]


def test_report_script_bad_variant_one_line_before_loading(monkeypatch, capsys):
    for argv, message in (
            (["--variants", "none,snap128"], "variant part 'snap128' is unknown; valid forms: none, merge, snapkvN"),
            (["--variants", "merge+kivi4"], "merge=True with quant_method='kivi' is not supported"),
            (["--controls", "snapkv128,merge"], "control 'merge': merge exists only in CommonKV")):
        assert message in _report_error(monkeypatch, capsys, argv)
