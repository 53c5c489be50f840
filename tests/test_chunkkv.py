"""ChunkKV keeps whole chunks ranked by their summed window votes (reference computed by hand)."""
import pytest
import torch

import pyramidkv
from pyramidkv.methods.base import PrefillInputs, window_attention
from conftest import greedy, prompt, tiny_model


def inputs(seq_len=40, heads=4, kv_heads=2, dim=8, padding=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1 if padding is None else padding.shape[0], heads, seq_len, dim, generator=g)
    k = torch.randn(q.shape[0], kv_heads, seq_len, dim, generator=g)
    return PrefillInputs(q, k, k.clone(), padding, 0, 1, dim ** -0.5)


def test_keeps_the_best_whole_chunks_shared_by_heads():
    x = inputs()
    method = pyramidkv.build_method("ChunkKV", max_capacity_prompt=4 + 15, window_size=4, chunk_size=5)
    keep = method.select(x, 19)
    votes = window_attention(x, 4)[..., :36].sum(2)  # [1, 4 query heads, 36]
    per_kv = votes.view(1, 2, 2, 36).mean(2)
    # 36 prefix tokens -> chunks of 5 (the last holds 1); summed over both KV heads (shared_heads)
    totals = torch.stack([per_kv.sum(1)[0, c * 5:(c + 1) * 5].sum() for c in range(8)])
    best = totals.argsort(descending=True)[:3].sort().values
    expected = torch.cat([torch.arange(c * 5, c * 5 + 5) for c in best.tolist()] + [torch.arange(36, 40)])
    for head in range(2):
        assert keep[0, head].tolist() == expected.tolist()


def test_chunks_start_at_each_rows_first_real_token():
    row = inputs(seq_len=30, seed=3)
    padded_q = torch.cat([torch.zeros(1, 4, 7, 8), row.query], 2)
    padded_k = torch.cat([torch.zeros(1, 2, 7, 8), row.keys], 2)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.bool), torch.ones(1, 30, dtype=torch.bool)], 1)
    padded = PrefillInputs(padded_q, padded_k, padded_k.clone(), mask, 0, 1, row.scaling)
    method = pyramidkv.build_method("ChunkKV", max_capacity_prompt=14, window_size=4, chunk_size=5)
    single = method.select(row, 14)
    batched = method.select(padded, 14)
    assert (batched - 7).tolist() == single.tolist()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_chunk_size_is_one_line_error(bad):
    with pytest.raises(ValueError, match=f"chunk_size={bad!r} is invalid"):
        pyramidkv.build_method("ChunkKV", chunk_size=bad)


def test_budget_at_least_prompt_is_the_unpatched_model():
    model = tiny_model()
    ids = prompt(40)
    reference = greedy(model, ids)
    with pyramidkv.compress(model, "chunkkv", max_capacity_prompt=64, window_size=8):
        out = greedy(model, ids)
    assert torch.equal(out.sequences, reference.sequences)
    for a, b in zip(out.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
