"""Invariants 6 and 7: PyramidKV budgets, and SnapKV's selection against a reference built from the
model's own attention weights."""

import pytest
import torch
import torch.nn.functional as F

import pyramidkv
from conftest import greedy, prompt, tiny_model


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
def test_snapkv_keeps_top_pooled_window_votes(pooling):
    capacity, window, kernel, length = 24, 6, 5, 80
    model = tiny_model(attn="eager", layers=2, heads=8, kv_heads=2)
    ids = prompt(length)
    with torch.no_grad():
        full = model(ids, output_attentions=True, use_cache=True)
    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=capacity, window_size=window,
                            kernel_size=kernel, pooling=pooling):
        cache = greedy(model, ids, new_tokens=1).past_key_values
    for layer_idx, attention in enumerate(full.attentions):  # [1, 8 query heads, S, S]
        votes = attention[0, :, -window:, : length - window].sum(dim=1)  # [8, S-w]
        pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
        pooled = pool(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        per_kv_head = pooled.view(2, 4, -1).mean(dim=1)  # GQA: average each group of 4 query heads
        full_keys = full.past_key_values.layers[layer_idx].keys[0]  # [2, S, D]
        stored = cache.layers[layer_idx].keys[0]
        assert stored.shape == (2, capacity, 8)
        for head in range(2):
            top = sorted(per_kv_head[head].topk(capacity - window).indices.tolist())
            expected = top + list(range(length - window, length))
            torch.testing.assert_close(stored[head], full_keys[head, expected], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "capacity,window,layers,length",
    [(128, 8, 32, 4096), (64, 8, 32, 1000), (2048, 32, 32, 8000), (96, 16, 5, 300), (40, 8, 4, 150)],
)
def test_pyramid_budgets_decrease_and_sum_exactly(capacity, window, layers, length):
    method = pyramidkv.build_method("PyramidKV", max_capacity_prompt=capacity, window_size=window)
    budgets = method.layer_budgets(length, layers)
    assert len(budgets) == layers
    assert sum(budgets) == layers * capacity  # exactly L*(C-w) prefix tokens plus L windows
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert budgets[0] > budgets[-1]
    assert all(window < b <= length for b in budgets)


def test_pyramid_falls_back_to_uniform_and_keeps_short_prompts():
    method = pyramidkv.build_method("PyramidKV", max_capacity_prompt=128, window_size=8)
    assert method.layer_budgets(200, 4) == [128] * 4  # 200 < 2*(128-8): uniform, as in the paper's code
    assert method.layer_budgets(100, 4) == [100] * 4  # prompt fits: keep it whole


def test_pyramid_with_eager_mask_sized_for_largest_layer():
    model = tiny_model(attn="eager", layers=4)
    with pyramidkv.compress(model, "pyramidkv", max_capacity_prompt=40):
        out = greedy(model, prompt(150), new_tokens=5, attention_mask=torch.ones(1, 150, dtype=torch.long))
    kept = out.past_key_values.kept_tokens()
    assert len(set(kept)) == 4
    assert out.past_key_values.physical_lengths() == [k + 4 for k in kept]
