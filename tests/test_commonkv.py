"""CommonKV (pyramidkv/commonkv.py, methods/commonkv.py): shared latent K/V, exactness at full rank,
latent bytes, factor caching, untouched projections outside a CommonKV cache, one-line errors."""

import json

import pytest
import torch

import pyramidkv
from pyramidkv import commonkv
from pyramidkv.cache import CompressedCache

from conftest import assert_same_generation, prompt, tiny_model


@pytest.fixture(autouse=True)
def factor_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(commonkv, "CACHE_DIR", tmp_path / "commonkv")
    commonkv._MEMORY.clear()


def _generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_rank_equals_fullkv(family, attn):
    model = tiny_model(family, seed=3 if family == "mistral" else 0, layers=3, attn=attn)
    ids = prompt(24)
    ref = _generate(model, ids)
    with pyramidkv.compress(model, "commonkv", layer_step=2):
        out = _generate(model, ids)
    assert_same_generation(ref, out)


def test_left_padded_batch_equals_single_rows():
    model = tiny_model(layers=2)
    ids = prompt(16, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    with pyramidkv.compress(model, "commonkv", layer_step=2):
        batch = _generate(model, ids, attention_mask=mask)
    single = _generate(model, ids[:1, 5:])
    assert torch.equal(batch.sequences[0, 16:], single.sequences[0, 11:])
    for a, b in zip(batch.logits, single.logits):  # rebuilt keys at the row's own positions
        assert ((a[0] - b[0]).abs().max() / b.abs().max()).item() < 1e-4


@pytest.mark.parametrize("factorization", [{}, {"factorization": "whitened", "calibration_tokens": 96}])
def test_low_rank_equals_model_with_factored_weights(factorization):
    # oracle: the rank-r model is the model whose K/V weights are U_k A and U_v A, run without a cache trick
    import copy

    model = tiny_model(layers=3)
    ids = prompt(20)
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8, **factorization):
        out = _generate(model, ids)
    factors = commonkv.compute_factors(model.model, pyramidkv.methods.build_method("commonkv", layer_step=2, rank=8,
                                                                                   **factorization))
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(oracle.model.layers):
            layer.self_attn.k_proj.weight.copy_(factors["Uk"][i] @ factors["A"][i])
            layer.self_attn.v_proj.weight.copy_(factors["Uv"][i] @ factors["A"][i])
    ref = _generate(oracle, ids)
    assert_same_generation(ref, out)


def test_low_rank_changes_output_and_nbytes_is_latent_formula():
    model = tiny_model(layers=3)  # hidden 64, kv dim 2 x 16 = 32; groups [0, 1], [2]
    ids = prompt(20)
    rank = 8
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=rank):
        cache = CompressedCache("commonkv", model.config, layer_step=2, rank=rank)
        logits = model(ids, past_key_values=cache).logits
        element = 4  # fp32
        assert cache.nbytes() == 3 * 20 * rank * element
        assert cache.kept_tokens() == [20, 20, 20]
        model(ids[:, :1], past_key_values=cache)  # one decode step appends one latent per layer
        assert cache.nbytes() == 3 * 21 * rank * element
        assert [layer.latents.shape[1] for layer in cache.layers] == [21] * 3
    full = model(ids).logits
    assert not torch.allclose(full, logits, atol=1e-3)  # rank 8 of 64 is lossy: the latent path was used


def _merged_run(model, ids, **config):
    with pyramidkv.compress(model, "commonkv", **config):
        cache = CompressedCache("commonkv", model.config, **config)
        model(ids, past_key_values=cache)
        return cache


def test_merge_bookkeeping_and_bytes():
    model = tiny_model(layers=4)
    ids = prompt(140)  # eligible positions 4..11: 8 per group, 2 groups of 2 -> 16 pairs
    rank = 8
    plain = _merged_run(model, ids, layer_step=2, rank=rank)
    cache = _merged_run(model, ids, layer_step=2, rank=rank, merge=True, no_merge_ratio=0.4)
    merged = sum(cache.layers[g].shared["latents"][0].shape[0] for g in (0, 2))  # per row: row 0
    assert merged == 16 - 7  # ceil(0.4 x 16) pairs stay per layer
    own = sum(layer.own[0]["latents"].shape[0] for layer in cache.layers)
    assert own == 4 * 140 - 2 * merged
    assert cache.nbytes() == (own + merged) * rank * 4  # merged latents counted once per group
    assert cache.nbytes() == plain.nbytes() - merged * rank * 4
    for g in (0, 2):
        shared = cache.layers[g].shared
        positions = shared["positions"][0]
        assert bool(((positions >= 4) & (positions < 140 - 128)).all())  # first 4 / last 128 untouched
        mean = (plain.layers[g].latents[:, positions] + plain.layers[g + 1].latents[:, positions]) / 2
        assert torch.allclose(shared["latents"][0], mean[0])
        for l in (g, g + 1):  # every other slot is the layer's own latent, in prompt order
            latents, order_positions = cache.layers[l].all_latents()
            assert torch.equal(order_positions, plain.layers[l].positions)
            kept = torch.ones(140, dtype=torch.bool)
            kept[positions] = False
            assert torch.equal(latents[:, kept], plain.layers[l].latents[:, kept])
    # the merged pairs are the most similar ones: mean cosine of the two layers' latents
    sims, merged_flags = [], []
    for g in (0, 2):
        a, b = plain.layers[g].latents[0, 4:12], plain.layers[g + 1].latents[0, 4:12]
        sims.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
        flags = torch.zeros(8, dtype=torch.bool)
        flags[cache.layers[g].shared["positions"][0] - 4] = True
        merged_flags.append(flags)
    sims, merged_flags = torch.cat(sims), torch.cat(merged_flags)
    assert sims[merged_flags].min() >= sims[~merged_flags].max() - 1e-6
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=rank, merge=True):
        model(ids[:, :1], past_key_values=cache)  # decode appends one own latent per layer
    assert cache.nbytes() == (own + 4 + merged) * rank * 4
    none_merged = _merged_run(model, ids, layer_step=2, rank=rank, merge=True, no_merge_ratio=1.0)
    assert none_merged.nbytes() == plain.nbytes()


def test_merged_decode_differs_but_runs():
    model = tiny_model(layers=4)
    ids = prompt(200)
    with pyramidkv.compress(model, "commonkv", layer_step=2, merge=True, no_merge_ratio=0.0):
        out = _generate(model, ids)
    with pyramidkv.compress(model, "commonkv", layer_step=2):
        ref = _generate(model, ids)
    assert out.sequences.shape == ref.sequences.shape
    assert not torch.allclose(out.logits[1], ref.logits[1])  # decode reads the merged latents


def test_rank_file_per_layer(tmp_path):
    model = tiny_model(layers=3)
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps([4, 8, 16]))
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank_file=str(path)):
        cache = CompressedCache("commonkv", model.config, layer_step=2, rank_file=str(path))
        model(prompt(10), past_key_values=cache)
    assert [layer.latents.shape[-1] for layer in cache.layers] == [4, 8, 16]
    path.write_text(json.dumps([4, 8]))
    with pytest.raises(ValueError, match="gives 2 ranks but the model has 3 layers"):
        with pyramidkv.compress(model, "commonkv", rank_file=str(path)):
            model(prompt(10))


def test_factors_cached_on_disk_and_in_memory():
    model = tiny_model(layers=3)
    before = commonkv.SVD_CALLS[0]
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8):
        model(prompt(8))
    assert commonkv.SVD_CALLS[0] == before + 2  # two groups
    assert len(list(commonkv.CACHE_DIR.glob("*.pt"))) == 1
    commonkv._MEMORY.clear()  # a new process: loads from disk, no SVD
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8):
        model(prompt(8))
    assert commonkv.SVD_CALLS[0] == before + 2
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=4):  # other settings: a new entry
        model(prompt(8))
    assert commonkv.SVD_CALLS[0] == before + 4


def test_projections_unchanged_without_commonkv_cache():
    model = tiny_model(layers=2)
    ids = prompt(12)
    ref = model(ids).logits
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=4):
        model(ids)
    assert model.model.layers[0].self_attn._pyramidkv_commonkv_hooks  # hooks stay installed
    assert torch.equal(model(ids).logits, ref)  # unpatched use
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=16):
        assert torch.equal(model(ids).logits, ref)  # another method


@pytest.mark.parametrize("config, message", [
    ({"layer_step": 0}, "layer_step=0 is invalid"),
    ({"rank": 0}, "rank=0 is invalid"),
    ({"merge": True, "merge_weights": [1.0]}, "give one weight per layer of a group"),
    ({"no_merge_ratio": 1.5}, "no_merge_ratio=1.5 is invalid"),
])
def test_bad_config_one_line(config, message):
    with pytest.raises(ValueError, match=message) as info:
        pyramidkv.methods.build_method("commonkv", **config)
    assert "\n" not in str(info.value)


def test_runner_float_layer_step_accepted():
    assert pyramidkv.methods.build_method("commonkv", layer_step=2.0).layer_step == 2


def test_rank_above_full_rank_and_unsupported_family():
    model = tiny_model(layers=3)  # group [2] alone: full rank min(64, 2 x 32) = 64
    with pytest.raises(ValueError, match="rank=65 for layer 0 is invalid: it must be an integer in 1..64"):
        with pyramidkv.compress(model, "commonkv", layer_step=2, rank=65):
            model(prompt(8))
    qwen = tiny_model("qwen3", layers=2)
    with pytest.raises(ValueError, match="does not support model family 'qwen3'"):
        with pyramidkv.compress(qwen, "commonkv"):
            qwen(prompt(8))


def test_original_projection_matmul_skipped_while_commonkv_active(monkeypatch):
    # the k_proj / v_proj weights' own matmul (F.linear in nn.Linear.forward) must not run under CommonKV
    model = tiny_model(layers=3)
    ids = prompt(12)
    projections = {id(p.weight) for layer in model.model.layers for p in (layer.self_attn.k_proj, layer.self_attn.v_proj)}
    calls = [0]
    original = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        calls[0] += id(weight) in projections
        return original(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    ref = model(ids).logits
    assert calls[0] == 6  # the count works: 3 layers x (k, v) without pyramidkv
    with pyramidkv.compress(model, "commonkv", layer_step=2):
        calls[0] = 0
        out = _generate(model, ids)
        assert calls[0] == 0
    assert torch.equal(model(ids).logits, ref)  # wrapped but inactive: the projection's own output
    assert calls[0] == 6
    assert ((out.logits[0] - ref[:, -1]).abs().max() / ref.abs().max()).item() < 1e-4  # full rank still exact
