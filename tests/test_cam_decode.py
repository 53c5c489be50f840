"""CaM's decode form: H2O's decode eviction, and the evicted token's value merged into the next m kept
slots with probability clamp(Ā_e / mean Ā of those slots, 0, 1), against a loop written slot by slot."""

import pytest
import torch

import pyramidkv
from pyramidkv.methods.decode import DecodeInputs
from conftest import greedy, prompt, tiny_model

CACHE, WINDOW = 8, 3


def decode_inputs(seed, slots=CACHE + 1, step=5):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 1, slots, 4, generator=generator)
    values = torch.randn(1, 1, slots, 4, generator=generator)
    query = torch.randn(1, 2, 1, 4, generator=generator)
    accumulated = torch.rand(1, 1, slots, generator=generator) * 3
    hidden = torch.zeros(1, slots, dtype=torch.bool)
    return DecodeInputs(query, keys, values, hidden, None, 1, 2, 0.5, {"accumulated": accumulated}, step)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [None, 1, 2])
def test_one_step_equals_the_slot_by_slot_reference(seed, m):
    d = decode_inputs(seed)
    original = d.values[0, 0].clone()
    scores = d.state["accumulated"][0, 0].tolist()
    method = pyramidkv.build_method("CaM", window_size=WINDOW, max_cache_size=CACHE, merge_window=m, seed=7)
    keep = method.decode_select(d, [CACHE])[0, 0].tolist()
    slots = d.slots
    # H2O: the last WINDOW slots, and the CACHE - WINDOW highest accumulated among the others
    older = sorted(range(slots - WINDOW), key=lambda j: (-scores[j], j))[: CACHE - WINDOW]
    assert keep == sorted(older) + list(range(slots - WINDOW, slots))
    (evicted,) = [j for j in range(slots) if j not in keep]
    draw = torch.rand(1, 1, generator=method._generator(1, 5, "cpu"))[0, 0]
    targets = [j for j in keep if j > evicted][: m or WINDOW]
    mean = sum(scores[j] for j in targets) / len(targets)
    expected = {j: original[j].clone() for j in keep}
    if draw < min(1.0, scores[evicted] / mean):
        for j in targets:
            expected[j] += original[evicted] / (m or WINDOW)
    for j in keep:
        torch.testing.assert_close(d.values[0, 0, j], expected[j], rtol=0, atol=1e-6)


def test_some_step_merges_and_the_draws_follow_the_step():
    merged_any, draws = False, set()
    for seed in range(12):
        for step in (1, 2):
            d = decode_inputs(seed, step=step)
            before = d.values.clone()
            keep = pyramidkv.build_method("CaM", window_size=WINDOW, max_cache_size=CACHE).decode_select(d, [CACHE])
            merged_any |= not torch.equal(before.gather(2, keep[..., None].expand(-1, -1, -1, 4)),
                                          d.values.gather(2, keep[..., None].expand(-1, -1, -1, 4)))
        draws.add(float(torch.rand(1, generator=pyramidkv.build_method("CaM")._generator(0, seed, "cpu"))))
    assert merged_any
    assert len(draws) == 12


def test_generation_keeps_the_cache_size_and_differs_from_h2o():
    model = tiny_model(layers=2)
    runs = {}
    for method in ("h2o", "cam"):
        with pyramidkv.compress(model, method, window_size=4, max_cache_size=16):
            runs[method] = greedy(model, prompt(30), new_tokens=25)
        assert runs[method].past_key_values.physical_lengths() == [16, 16]
    # same evictions, but CaM's merged values change the logits
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(runs["h2o"].logits, runs["cam"].logits))
