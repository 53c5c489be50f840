"""Invariant 5: each row of a left-padded batch equals its own single-row run; pads are never kept.

Budgets are per row (from each row's real length), so this holds for PyramidKV too, whose schedule
depends on the length: at C=32, w=8, 3 layers, a 90-token row gets the pyramid, a 50-token row the
clamped pyramid (50 - 8 < 2(C-w) - low), a 40-token row the uniform fallback (40 < 2(C-w)), and a
25-token row (shorter than the budget) is kept whole.
"""

import pytest
import torch

import pyramidkv
from conftest import greedy, prompt, tiny_model

LENGTHS = (90, 50, 40, 25)


def left_padded(rows):
    width = max(row.shape[1] for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :] = row[0]
        mask[i, width - row.shape[1] :] = 1
    return ids, mask


def test_pyramid_schedules_of_these_rows_differ():
    """The premise of the batch test: the rows' own PyramidKV schedules are all different."""
    method = pyramidkv.build_method("PyramidKV", max_capacity_prompt=32, window_size=8)
    schedules = {tuple(method.layer_budgets(length, 3)) for length in LENGTHS}
    assert len(schedules) == len(LENGTHS)
    assert method.layer_budgets(25, 3) == [25, 25, 25]


@pytest.mark.parametrize("method", ["SnapKV", "PyramidKV", "H2O", "StreamingLLM", "L2Norm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_rows_equal_single_runs(method, attn):
    model = tiny_model(attn=attn)
    rows = [prompt(length, seed=length) for length in LENGTHS]
    ids, mask = left_padded(rows)
    config = {"max_capacity_prompt": 32, "window_size": 8}
    with pyramidkv.compress(model, method, **config):
        batched = greedy(model, ids, attention_mask=mask)
        singles = [greedy(model, row) for row in rows]
    per_row = batched.past_key_values.kept_tokens_per_row()  # [layer][row]
    for b, single in enumerate(singles):
        assert torch.equal(batched.sequences[b, ids.shape[1] :], single.sequences[0, rows[b].shape[1] :])
        for batch_logits, single_logits in zip(batched.logits, single.logits):
            torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)
        assert [layer[b] for layer in per_row] == single.past_key_values.kept_tokens()
        # the row's kept tokens sit in its last slots, and are the single run's (so no pad was kept)
        for layer_batched, layer_single in zip(batched.past_key_values.layers, single.past_key_values.layers):
            slots, kept = layer_batched.kept_after_prefill, layer_single.kept_after_prefill
            batched_keys = layer_batched.keys[b, :, slots - kept : slots]
            torch.testing.assert_close(batched_keys, layer_single.keys[0, :, :kept], rtol=0, atol=1e-4)
    assert batched.past_key_values.kept_tokens() == [max(layer) for layer in per_row]


def test_pyramid_batch_stores_fillers_only_where_needed():
    model = tiny_model()
    rows = [prompt(length, seed=length) for length in LENGTHS]
    ids, mask = left_padded(rows)
    with pyramidkv.compress(model, "pyramidkv", max_capacity_prompt=32, window_size=8):
        cache = greedy(model, ids, attention_mask=mask, new_tokens=1).past_key_values
    for layer, kept in zip(cache.layers, cache.kept_tokens_per_row()):
        slots = layer.kept_after_prefill
        assert layer.keys.shape[-2] == slots == max(kept)
        assert kept[-1] == 25  # shorter than every budget: kept whole
        if layer.filler_slots is not None:
            assert layer.filler_slots.sum(-1).tolist() == [slots - k for k in kept]
    assert any(layer.filler_slots is not None for layer in cache.layers)


def test_padded_pyramid_rows_equal_single_runs_on_a_reused_cache_and_with_beams():
    """Fillers stay hidden for a multi-token follow-up on the reused cache and through beam reordering."""
    model = tiny_model()
    rows = [prompt(length, seed=length) for length in LENGTHS]
    ids, mask = left_padded(rows)
    follow = prompt(3, batch=len(rows), seed=5)
    with pyramidkv.compress(model, "pyramidkv", max_capacity_prompt=32, window_size=8):
        first = greedy(model, ids, attention_mask=mask, new_tokens=2)
        more = torch.cat([first.sequences, follow], dim=1)
        more_mask = torch.cat([mask, torch.ones(len(rows), 5, dtype=torch.long)], dim=1)
        second = greedy(model, more, attention_mask=more_mask, past_key_values=first.past_key_values, new_tokens=3)
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False)
        for b, row in enumerate(rows):
            single_first = greedy(model, row, new_tokens=2)
            single_more = torch.cat([single_first.sequences, follow[b : b + 1]], dim=1)
            single = greedy(model, single_more, past_key_values=single_first.past_key_values, new_tokens=3)
            assert torch.equal(second.sequences[b, more.shape[1] :], single.sequences[0, single_more.shape[1] :])
            for batch_logits, single_logits in zip(second.logits, single.logits):
                torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)
            single_beams = model.generate(row, max_new_tokens=4, num_beams=3, do_sample=False)
            assert torch.equal(beams[b, ids.shape[1] :], single_beams[0, row.shape[1] :])
