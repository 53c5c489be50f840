"""SimCalKV / KeepKV / CaM / PyramidInfer against references written token by token (plain loops) on
tiny inputs: 1 row, 2 query heads sharing 1 KV head (GQA), 8 tokens, head_dim 3."""

import math

import pytest
import torch

import pyramidkv
from pyramidkv.methods import PrefillInputs
from pyramidkv.methods.merging import most_similar_slot

S, D, WINDOW, BUDGET = 8, 3, 2, 5


def tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 2, S, D, generator=g)
    keys = torch.randn(1, 1, S, D, generator=g)
    values = torch.randn(1, 1, S, D, generator=g)
    return PrefillInputs(query, keys, values, None, layer_idx=0, num_layers=1, scaling=D ** -0.5)


def column_sums(x):
    """Accumulated attention per token: sum over every query (causal softmax), mean over the 2 heads."""
    total = [0.0] * S
    for head in range(2):
        for i in range(S):
            logits = [float(x.query[0, head, i] @ x.keys[0, 0, j]) * x.scaling for j in range(i + 1)]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            for j in range(i + 1):
                total[j] += weights[j] / sum(weights) / 2
    return total


def split(x, budget=BUDGET):
    scores = column_sums(x)
    prefix = sorted(range(S - WINDOW), key=lambda j: -scores[j])[: budget - WINDOW]
    kept = sorted(prefix) + list(range(S - WINDOW, S))
    return kept, [j for j in range(S) if j not in kept], scores


def last_query_weight(x, j):
    return sum(math.exp(float(x.query[0, h, -1] @ x.keys[0, 0, j]) * x.scaling) for h in range(2)) / 2


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def reference_merge(x, threshold, mode):
    kept, evicted, _ = split(x)
    k, v = x.keys[0, 0], x.values[0, 0]
    groups = {c: [] for c in kept}
    for e in evicted:
        sims = [cosine(k[e], k[c]) for c in kept]
        best = max(range(len(kept)), key=lambda i: sims[i])
        if sims[best] > threshold:
            groups[kept[best]].append(e)
    keys, values, bias = [], [], []
    for c in kept:
        members = groups[c]
        weights = [last_query_weight(x, c)] + [last_query_weight(x, e) for e in members]
        states = [c] + members
        values.append(sum(w * v[t] for w, t in zip(weights, states)) / sum(weights))
        n = len(members)
        if mode == "exact":
            keys.append(sum(k[t] for t in states) / (n + 1))
        elif mode == "released":
            keys.append(k[c] if n == 0 else 0.5 * (sum(k[e] for e in members) / n + k[c]) + math.log(2))
        else:  # keepkv
            keys.append(sum(w * k[t] for w, t in zip(weights, states)) / sum(weights))
        bias.append(math.log(n + 1))
    return torch.stack(keys), torch.stack(values), torch.tensor(bias), groups


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.0, 0.5, -1.0])
@pytest.mark.parametrize("mode", ["exact", "released", "keepkv"])
def test_similarity_merges_equal_the_token_by_token_reference(seed, threshold, mode):
    x = tiny_inputs(seed)
    keys, values, bias, groups = reference_merge(x, threshold, mode)
    config = {"max_capacity_prompt": BUDGET, "window_size": WINDOW, "sim_threshold": threshold}
    if mode == "keepkv":
        out = pyramidkv.build_method("KeepKV", **config).compress(x, BUDGET)
    else:
        out = pyramidkv.build_method("SimCalKV", calibration=mode, **config).compress(x, BUDGET)
    torch.testing.assert_close(out[0][0, 0], keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1][0, 0], values, rtol=0, atol=1e-5)
    if mode == "exact":
        torch.testing.assert_close(out[2][0, 0], bias, rtol=0, atol=1e-6)
    else:
        assert len(out) == 2 or out[2] is None
    if threshold == -1.0:
        assert sum(len(g) for g in groups.values()) == S - BUDGET  # every evicted token merged somewhere


def test_threshold_above_every_similarity_is_plain_eviction():
    x = tiny_inputs(0)
    kept, _, _ = split(x)
    out = pyramidkv.build_method("SimCalKV", max_capacity_prompt=BUDGET, window_size=WINDOW,
                                 sim_threshold=1.0).compress(x, BUDGET)
    torch.testing.assert_close(out[0][0, 0], x.keys[0, 0, kept], rtol=0, atol=0)
    torch.testing.assert_close(out[1][0, 0], x.values[0, 0, kept], rtol=0, atol=1e-6)
    assert not bool(out[2].any())


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("m", [None, 1, 4])
def test_cam_equals_the_token_by_token_reference(seed, m):
    x = tiny_inputs(seed)
    method = pyramidkv.build_method("CaM", max_capacity_prompt=BUDGET, window_size=WINDOW, merge_window=m, seed=5)
    out = method.compress(x, BUDGET)
    kept, evicted, scores = split(x)
    merge = m or WINDOW
    draws = method._uniform_draws(x, 1)[0, 0]
    values = [x.values[0, 0, c].clone() for c in kept]
    for e in evicted:
        targets = [i for i, c in enumerate(kept) if c > e][:merge]
        mean = sum(scores[kept[i]] for i in targets) / len(targets)
        if draws[e] < min(1.0, scores[e] / mean):
            for i in targets:
                values[i] += x.values[0, 0, e] / merge
    torch.testing.assert_close(out[0][0, 0], x.keys[0, 0, kept], rtol=0, atol=0)  # keys are not merged
    torch.testing.assert_close(out[1][0, 0], torch.stack(values), rtol=0, atol=1e-6)


def test_cam_draws_are_seeded_and_merge_something():
    x = tiny_inputs(0)
    first = pyramidkv.build_method("CaM", max_capacity_prompt=BUDGET, window_size=WINDOW, seed=1).compress(x, BUDGET)
    again = pyramidkv.build_method("CaM", max_capacity_prompt=BUDGET, window_size=WINDOW, seed=1).compress(x, BUDGET)
    kept, _, _ = split(x)
    assert torch.equal(first[1], again[1])
    assert not torch.allclose(first[1][0, 0], x.values[0, 0, kept])  # some value did change


def test_pyramidinfer_ratio_grows_by_one_percent_per_layer():
    method = pyramidkv.build_method("PyramidInfer", compress_ratio=0.4)
    # layer l keeps n - floor((0.4 + 0.01 l) n): n=200 -> 120, 118, 116, 114
    assert method.layer_budgets(200, 4) == [120, 118, 116, 114]
    tokens = pyramidkv.build_method("PyramidInfer", max_capacity_prompt=64)
    assert tokens.layer_budgets(300, 3) == [64, 61, 58]
    assert tokens.layer_budgets(40, 3) == [40, 40, 40]  # shorter than the budget: kept whole


def test_similarity_chunks_do_not_change_the_match():
    g = torch.Generator().manual_seed(0)
    evicted, slots = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, 20, 8, generator=g)
    real = torch.ones(2, 1, 20, dtype=torch.bool)
    real[1, :, :4] = False  # row 1's first slots are fillers: never a target
    whole = most_similar_slot(evicted, slots, real, chunk_elements=1 << 25)
    chunked = most_similar_slot(evicted, slots, real, chunk_elements=2 * 3 * 20 * 3)  # 3 rows per chunk
    assert torch.equal(whole[1], chunked[1]) and torch.allclose(whole[0], chunked[0])
    assert bool((whole[1][1] >= 4).all())
