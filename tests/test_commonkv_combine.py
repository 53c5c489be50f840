"""CommonKV combined with eviction (evict_method), latent quantization (quant_method='kivi') and
cross-layer merge in a batch (pyramidkv/commonkv.py, commonkv_quant.py, methods/commonkv.py)."""

import argparse

import pytest
import torch
import torch.nn.functional as F

import pyramidkv
from pyramidkv import commonkv, predict
from pyramidkv.cache import CompressedCache

from conftest import left_padded, prompt, tiny_model


@pytest.fixture(autouse=True)
def factor_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(commonkv, "CACHE_DIR", tmp_path / "commonkv")
    commonkv._MEMORY.clear()


def _generate(model, ids, **kw):
    return model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kw)


def _assert_rows_equal_singles(batch, singles, ids, rows):
    """Left-padded batch rows = their single runs: the same new tokens, logits within 1e-4 relative."""
    for b, single in enumerate(singles):
        assert torch.equal(batch.sequences[b, ids.shape[1]:], single.sequences[0, rows[b].shape[1]:])
        for a, s in zip(batch.logits, single.logits):
            assert ((a[b] - s[0]).abs().max() / s.abs().max()).item() < 1e-4


def _prefill(model, ids, capture=None, **config):
    with pyramidkv.compress(model, "commonkv", **config):
        cache = CompressedCache("commonkv", model.config, **config)
        model(ids, past_key_values=cache)
    return cache


# ---- evict_method ------------------------------------------------------------------------------
def test_evict_budget_above_prompt_is_exactly_no_evict():
    model = tiny_model(layers=3)
    ids = prompt(30)
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8):
        ref = _generate(model, ids)
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8, evict_method="SnapKV", max_capacity_prompt=64):
        out = _generate(model, ids)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))


def _snapkv_reference(query, key, budget, window, kernel, scaling):
    """By hand: SnapKV's pooled window votes, averaged over each KV head's query group, summed over the KV
    heads; the top (budget - window) prefix positions plus the window."""
    heads, kv_heads, seq = query.shape[1], key.shape[1], key.shape[2]
    keys = key.repeat_interleave(heads // kv_heads, dim=1)
    logits = (query[0, :, -window:].float() @ keys[0].float().transpose(1, 2)) * scaling  # [Hq, w, S]
    q_pos = torch.arange(seq - window, seq)[:, None]
    logits = logits.masked_fill(torch.arange(seq)[None, :] > q_pos, float("-inf"))
    votes = logits.softmax(-1)[..., : seq - window].sum(1)  # [Hq, S - w]
    pooled = F.max_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0, : seq - window]
    per_kv = pooled.view(kv_heads, heads // kv_heads, -1).mean(1).sum(0)
    top = per_kv.argsort(descending=True, stable=True)[: budget - window].sort().values
    return torch.cat([top, torch.arange(seq - window, seq)])


def test_evict_kept_positions_equal_hand_reference_and_nbytes(monkeypatch):
    model = tiny_model(layers=3)  # 4 query heads, 2 KV heads: GQA
    ids, rank, budget, window = prompt(40), 8, 16, 4
    seen = {}
    original = CompressedCache.compress_layer

    def recording(self, layer_idx, query, keys, values, scaling):
        seen[layer_idx] = (query.clone(), keys.clone(), scaling)
        return original(self, layer_idx, query, keys, values, scaling)

    monkeypatch.setattr(CompressedCache, "compress_layer", recording)
    config = dict(layer_step=2, rank=rank, evict_method="snapkv", max_capacity_prompt=budget, window_size=window,
                  kernel_size=3)
    plain = _prefill(model, ids, layer_step=2, rank=rank)
    cache = _prefill(model, ids, **config)
    assert sorted(seen) == [0, 1, 2]
    for layer_idx, (query, keys, scaling) in seen.items():
        layer = cache.layers[layer_idx]
        expected = _snapkv_reference(query, keys, budget, window, 3, scaling)
        assert torch.equal(layer.positions[0], expected)
        assert torch.equal(layer.latents, plain.layers[layer_idx].latents[:, expected])  # the kept latents
        # the scored K are the ones rebuilt from the latent (full rank: = the model's K up to fp error)
        rebuilt, _ = plain.layers[layer_idx].rebuild(keys.shape[1], keys.shape[-1])
        assert torch.allclose(rebuilt, keys, atol=1e-5)
    assert cache.kept_tokens() == [budget] * 3
    assert cache.nbytes() == 3 * budget * rank * 4  # kept x rank x fp32 per layer
    with pyramidkv.compress(model, "commonkv", **config):
        model(ids[:, :1], past_key_values=cache)  # decode appends one latent per layer
    assert cache.nbytes() == 3 * (budget + 1) * rank * 4


def test_evict_pyramid_schedule_bytes_per_layer():
    model = tiny_model(layers=4)
    ids, rank = prompt(60), 4
    cache = _prefill(model, ids, layer_step=2, rank=rank, evict_method="PyramidKV", max_capacity_prompt=24)
    kept = cache.kept_tokens()
    expected = pyramidkv.methods.build_method("pyramidkv", max_capacity_prompt=24).layer_budgets(60, 4)
    assert kept == expected and len(set(kept)) > 1  # the pyramid: per-layer budgets
    assert cache.nbytes() == sum(kept) * rank * 4
    assert [layer.latents.shape[1] for layer in cache.layers] == kept


@pytest.mark.parametrize("budget", [{"max_capacity_prompt": 20}, {"keep_ratio": 0.5}])  # ratio: rows below K
def test_evict_left_padded_rows_equal_single_runs(budget):
    model = tiny_model(layers=2)
    rows = [prompt(40, seed=2), prompt(28, seed=3)]
    ids, mask = left_padded(rows)
    config = dict(layer_step=2, rank=8, evict_method="SnapKV", window_size=4, **budget)
    with pyramidkv.compress(model, "commonkv", **config):
        batch = _generate(model, ids, attention_mask=mask)
        singles = [_generate(model, row) for row in rows]
        if "keep_ratio" in budget:  # the short row keeps 14 of the 20 slots: 6 hidden fillers
            cache = CompressedCache("commonkv", model.config, **config)
            model(ids, attention_mask=mask, past_key_values=cache)
            assert cache.kept_tokens_per_row()[0] == [20, 14] and cache.layers[0].filler_slots[1].sum() == 6
    _assert_rows_equal_singles(batch, singles, ids, rows)


@pytest.mark.parametrize("evict", ["SnapKV", "PyramidKV", "H2O", "StreamingLLM", "L2Norm", "ChunkKV",
                                   "PyramidInfer", "TOVA"])
def test_every_evict_choice_runs_and_bytes_are_kept_latents(evict):
    from pyramidkv.methods.commonkv import evict_choices

    assert evict in evict_choices()
    model = tiny_model(layers=4)
    config = dict(layer_step=2, rank=8, evict_method=evict, max_capacity_prompt=20)
    with pyramidkv.compress(model, "commonkv", **config):
        out = _generate(model, prompt(50))
    cache = out.past_key_values
    expected = pyramidkv.methods.build_method(evict, max_capacity_prompt=20).layer_budgets(50, 4)
    assert cache.kept_tokens() == expected
    assert cache.nbytes() == sum(kept + 4 for kept in expected) * 8 * 4  # + the 4 decode steps' latents


@pytest.mark.parametrize("config, message", [
    ({"evict_method": "bogus"}, "evict_method='bogus' is invalid; valid choices: .*SnapKV"),
    ({"evict_method": "AdaKV"}, "evict_method='AdaKV' is invalid; valid choices: .*SnapKV"),
    ({"evict_method": "SnapKV", "gqa_selection": "query_head"}, "gqa_selection='query_head' is invalid"),
])
def test_evict_bad_config_one_line(config, message):
    with pytest.raises(ValueError, match=message) as info:
        pyramidkv.methods.build_method("commonkv", **config)
    assert "\n" not in str(info.value)


def test_runner_flags_reach_commonkv():
    import run_longbench
    import run_ruler

    argv = ["--method", "CommonKV", "--evict_method", "SnapKV", "--max_capacity_prompts", "64", "--layer_step", "2",
            "--quant_method", "kivi", "--nbits", "8"]
    for runner in (run_ruler, run_longbench):
        args = runner.build_parser().parse_args([*argv, *(["--model_path", "x"] if runner is run_longbench else [])])
        predict.validate_method_args(args)
        built = pyramidkv.methods.build_method(args.method, **predict.method_config(args))
        assert (built.evict_method, built.max_capacity_prompt, built.layer_step) == ("SnapKV", 64, 2)
        assert (built.quant_method, built.nbits) == ("kivi", 8)


# ---- quant_method="kivi" ------------------------------------------------------------------------
QUANT = dict(quant_method="kivi", group_size=16, residual_length=8)


def _quant_bytes(tokens, rank, nbits, group=16, full=8, element=4):
    """The packed formula of commonkv_quant.py for one row of one layer."""
    q = max(0, (tokens - full) // group) * group
    return q * rank * nbits // 8 + 2 * (q // group) * rank * element + (tokens - q) * rank * element


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_quant_nbytes_is_packed_formula_prefill_and_decode(nbits):
    model = tiny_model(layers=3)
    ids, rank = prompt(100), 8
    config = dict(layer_step=2, rank=rank, nbits=nbits, **QUANT)
    with pyramidkv.compress(model, "commonkv", **config):
        cache = CompressedCache("commonkv", model.config, **config)
        model(ids, past_key_values=cache)
        assert cache.nbytes() == 3 * _quant_bytes(100, rank, nbits)  # 80 tokens quantized, 20 in full precision
        assert cache.nbytes() < _prefill(model, ids, layer_step=2, rank=rank).nbytes()
        for step in range(13):  # 100 + 13 - 8 = 105 >= 6 x 16: a sixth group is quantized at the last step
            model(ids[:, :1], past_key_values=cache)
        assert cache.nbytes() == 3 * _quant_bytes(113, rank, nbits)
        assert [layer.physical_length for layer in cache.layers] == [113] * 3
        assert cache.layers[0].rows[0].codes.shape == (96, rank * nbits // 8)


def test_quant_8bit_logits_close_to_unquantized_and_2bit_lossier():
    model = tiny_model(layers=3)
    ids = prompt(100)
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8):
        ref = _generate(model, ids)
    errors = {}
    for nbits in (8, 2):
        with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8, nbits=nbits, **QUANT):
            out = _generate(model, ids)
        errors[nbits] = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref.logits[1:], out.logits[1:]))
        assert torch.equal(ref.logits[0], out.logits[0])  # prefill attention runs on full precision
    assert 0 < errors[8] < 1e-2  # the decode steps read the dequantized latents
    assert errors[2] > 10 * errors[8]


def test_quant_with_evict_bytes_and_padded_rows_equal_single_runs():
    model = tiny_model(layers=2)
    rows = [prompt(90, seed=2), prompt(70, seed=3)]
    ids, mask = left_padded(rows)
    config = dict(layer_step=2, rank=8, nbits=4, evict_method="SnapKV", max_capacity_prompt=60, **QUANT)
    with pyramidkv.compress(model, "commonkv", **config):
        cache = CompressedCache("commonkv", model.config, **config)
        model(rows[0], past_key_values=cache)
        assert cache.nbytes() == 2 * _quant_bytes(60, 8, 4)  # kept tokens quantized
        batch = _generate(model, ids, attention_mask=mask)
        singles = [_generate(model, row) for row in rows]
    _assert_rows_equal_singles(batch, singles, ids, rows)
    no_evict = dict(layer_step=2, rank=8, nbits=4, **QUANT)  # a padded row without eviction: its real tokens only
    with pyramidkv.compress(model, "commonkv", **no_evict):
        cache = CompressedCache("commonkv", model.config, **no_evict)
        model(ids, attention_mask=mask, past_key_values=cache)
    assert cache.nbytes() == 2 * (_quant_bytes(90, 8, 4) + _quant_bytes(70, 8, 4))


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "kivi", "nbits": 3}, "nbits=3 is invalid; valid choices: 2, 4, 8"),
    ({"quant_method": "kivi", "merge": True}, "merge=True with quant_method='kivi' is not supported"),
    ({"quant_method": "int4"}, "quant_method='int4' is unknown; valid choices: none, kivi"),
])
def test_quant_bad_config_one_line(config, message):
    with pytest.raises(ValueError, match=message) as info:
        pyramidkv.methods.build_method("commonkv", **config)
    assert "\n" not in str(info.value)


def test_quant_rank_not_packable_one_line():
    model = tiny_model(layers=2)
    with pytest.raises(ValueError, match="rank=6 of layer 0 cannot be packed 4 codes per byte at nbits=2") as info:
        with pyramidkv.compress(model, "commonkv", layer_step=2, rank=6, quant_method="kivi", nbits=2):
            model(prompt(8))
    assert "\n" not in str(info.value)


# ---- merge=True in a batch ----------------------------------------------------------------------
def test_merge_per_row_padded_batch_equals_single_runs():
    model = tiny_model(layers=4)
    rows = [prompt(160, seed=2), prompt(145, seed=3)]  # eligible 4..31 and 4..16: different merges per row
    ids, mask = left_padded(rows)
    config = dict(layer_step=2, rank=8, merge=True, no_merge_ratio=0.4)
    with pyramidkv.compress(model, "commonkv", **config):
        batch = _generate(model, ids, attention_mask=mask)
        singles = [_generate(model, row) for row in rows]
        cache = CompressedCache("commonkv", model.config, **config)
        model(ids, attention_mask=mask, past_key_values=cache)
        single_caches = []
        for row in rows:
            single_caches.append(CompressedCache("commonkv", model.config, **config))
            model(row, past_key_values=single_caches[-1])
    pads = ids.shape[1] - rows[1].shape[1]
    for g in (0, 2):
        shared = cache.layers[g].shared
        for b, single in enumerate(single_caches):
            alone = single.layers[g].shared
            assert shared["latents"][b].shape[0] == alone["latents"][0].shape[0] > 0  # the single run's merge
            assert torch.equal(shared["positions"][b], alone["positions"][0])  # true positions: pads not counted
            assert torch.allclose(shared["latents"][b], alone["latents"][0], atol=1e-5)
    counts = [sum(cache.layers[g].shared["latents"][b].shape[0] for g in (0, 2)) for b in range(2)]
    assert counts[0] != counts[1] and counts == [2 * 28 - 23, 2 * 13 - 11]  # ceil(0.4 x pairs) stay per layer
    # bytes: each row's single-run bytes, plus the padded row's pad latents (own slots, masked)
    assert cache.nbytes() == sum(c.nbytes() for c in single_caches) + 4 * pads * 8 * 4
    _assert_rows_equal_singles(batch, singles, ids, rows)


# ---- evict_method + merge=True: evict first, then merge -----------------------------------------
def test_evict_then_merge_budget_above_prompt_is_exactly_merge():
    model = tiny_model(layers=4)
    ids = prompt(160)
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8, merge=True):
        ref = _generate(model, ids)
    with pyramidkv.compress(model, "commonkv", layer_step=2, rank=8, merge=True, evict_method="SnapKV",
                           max_capacity_prompt=400):
        out = _generate(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))
    merged = _prefill(model, ids, layer_step=2, rank=8, merge=True, evict_method="SnapKV", max_capacity_prompt=400)
    assert merged.nbytes() == _prefill(model, ids, layer_step=2, rank=8, merge=True).nbytes()


def test_evict_then_merge_candidates_bytes_and_padded_rows():
    model = tiny_model(layers=4)
    rows = [prompt(300, seed=2), prompt(260, seed=3)]
    rank, budget = 8, 200
    evict = dict(layer_step=2, rank=rank, evict_method="SnapKV", max_capacity_prompt=budget)
    plain = _prefill(model, rows[0], **evict)  # evicted, not merged
    cache = _prefill(model, rows[0], merge=True, no_merge_ratio=0.4, **evict)
    saved = 0
    total_pairs, total_merged = 0, 0
    for g in (0, 2):
        kept = [set(plain.layers[l].positions[0].tolist()) for l in (g, g + 1)]
        candidates = sorted(p for p in kept[0] & kept[1] if 4 <= p < 300 - 128)
        positions = cache.layers[g].shared["positions"][0]
        assert set(positions.tolist()) <= set(candidates) and len(positions) > 0
        total_pairs, total_merged = total_pairs + len(candidates), total_merged + len(positions)
        slots = [[plain.layers[l].positions[0].tolist().index(p) for p in positions.tolist()] for l in (g, g + 1)]
        mean = (plain.layers[g].latents[0, slots[0]] + plain.layers[g + 1].latents[0, slots[1]]) / 2
        assert torch.allclose(cache.layers[g].shared["latents"][0], mean)
        for l in (g, g + 1):  # every layer still rebuilds its kept slots in order, merged ones included
            latents, order_positions = cache.layers[l].all_latents()
            assert torch.equal(order_positions, plain.layers[l].positions)
        saved += len(positions) * rank * 4  # one copy per group of two instead of two
    assert total_merged == total_pairs - -(-4 * total_pairs // 10)  # ceil(0.4 x pairs) stay per layer
    assert cache.nbytes() == plain.nbytes() - saved
    assert cache.kept_tokens() == [budget] * 4 and cache.physical_lengths() == [budget] * 4
    ids, mask = left_padded(rows)
    with pyramidkv.compress(model, "commonkv", merge=True, **evict):
        batch = _generate(model, ids, attention_mask=mask)
        singles = [_generate(model, row) for row in rows]
    _assert_rows_equal_singles(batch, singles, ids, rows)


def test_beam_search_refused_one_line():
    model = tiny_model(layers=2)
    with pytest.raises(ValueError, match="cannot reorder batch rows \\(beam search\\); valid choices: num_beams=1"):
        with pyramidkv.compress(model, "commonkv", layer_step=2):
            model.generate(prompt(10), max_new_tokens=3, num_beams=2, do_sample=False)
