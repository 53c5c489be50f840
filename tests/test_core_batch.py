"""Invariant 5: each row of a left-padded batch equals its own single-row run; pads are never kept."""

import pytest
import torch

import pyramidkv
from conftest import greedy, prompt, tiny_model

LENGTHS = (90, 70, 25)  # the last row is shorter than the budget


def left_padded(rows):
    width = max(row.shape[1] for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :] = row[0]
        mask[i, width - row.shape[1] :] = 1
    return ids, mask


@pytest.mark.parametrize("method", ["SnapKV", "PyramidKV", "H2O", "StreamingLLM", "L2Norm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_rows_equal_single_runs(method, attn):
    model = tiny_model(attn=attn)
    # PyramidKV's layer schedule depends on the prompt length, which in a batch is the padded length:
    # rows agree with single runs when their own schedule is the same (here: all rows > 54 tokens)
    lengths = (90, 70, 60) if method == "PyramidKV" else LENGTHS
    rows = [prompt(length, seed=length) for length in lengths]
    ids, mask = left_padded(rows)
    config = {"max_capacity_prompt": 32, "window_size": 8}
    with pyramidkv.compress(model, method, **config):
        batched = greedy(model, ids, attention_mask=mask)
        singles = [greedy(model, row) for row in rows]
    for b, single in enumerate(singles):
        assert torch.equal(batched.sequences[b, ids.shape[1] :], single.sequences[0, rows[b].shape[1] :])
        for batch_logits, single_logits in zip(batched.logits, single.logits):
            torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)
        if lengths[b] > 32:
            # same kept keys as the single run => no pad was selected
            for layer_batched, layer_single in zip(batched.past_key_values.layers, single.past_key_values.layers):
                kept = layer_single.kept_after_prefill
                if kept == lengths[b]:
                    continue  # an uncompressed layer (L2Norm skips the first ones) keeps the pads too
                batched_keys = layer_batched.keys[b, :, :kept]
                torch.testing.assert_close(batched_keys, layer_single.keys[0, :, :kept], rtol=0, atol=1e-4)
