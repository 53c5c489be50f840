"""H2O's (and so CaM's) ratio form: heavy_ratio / recent_ratio of each row's own prompt length.

Per-step reference: with the counts worked out by hand for one row (heavy = floor(heavy_ratio * S),
recent = floor(recent_ratio * S)), the ratio form must give the per-step reference of test_decode_methods
(unpatched model, 4-D mask of the reference's kept set) and the count form's logits; padded rows of
different lengths (so different budgets) must equal their single runs; the physical length stays at
heavy + recent while decoding; bad values are one-line errors."""

import pytest
import torch

import pyramidkv
from conftest import greedy, left_padded, prompt, tiny_model
from test_decode_methods import CACHE, RECENT, reference


def ratio_run(model, tokens, method, config, prompt_len, steps, expected_length):
    """Teacher-forced logits of the last position per step; checks the physical length every step."""
    with pyramidkv.compress(model, method, **config), torch.no_grad():
        out = model(tokens[:, :prompt_len])
        cache, logits = out.past_key_values, [out.logits[0, -1]]
        lengths = [cache.physical_lengths()]
        for p in range(prompt_len, prompt_len + steps - 1):
            out = model(tokens[:, p : p + 1], past_key_values=cache)
            logits.append(out.logits[0, -1])
            lengths.append(cache.physical_lengths())
    for step, length in enumerate(lengths):
        assert length == [expected_length(prompt_len + step)] * len(length), f"step {step}: {length}"
    return logits


@pytest.fixture
def one_layer():
    return tiny_model(attn="eager", layers=1, heads=2, kv_heads=1)


# by hand: 0.3 * 40 = 12 heavy + 0.1 * 40 = 4 recent; 0.15 * 80 = 12 + 0.05 * 80 = 4: the reference's 16 = 12 + 4
@pytest.mark.parametrize("prompt_len,heavy_ratio,recent_ratio", [(40, 0.3, 0.1), (80, 0.15, 0.05)])
def test_ratio_form_matches_the_per_step_reference_and_the_counts(one_layer, prompt_len, heavy_ratio, recent_ratio):
    assert (CACHE, RECENT) == (16, 4)
    tokens = prompt(prompt_len + 40, seed=5)
    expected = reference(one_layer, tokens, "h2o", prompt_len, 40)
    ratios = {"heavy_ratio": heavy_ratio, "recent_ratio": recent_ratio}
    ours = ratio_run(one_layer, tokens, "h2o", ratios, prompt_len, 40, lambda n: CACHE)
    counts = ratio_run(one_layer, tokens, "h2o", {"max_cache_size": CACHE, "window_size": RECENT,
                                                   "max_capacity_prompt": CACHE}, prompt_len, 40, lambda n: CACHE)
    for step, (a, b, c) in enumerate(zip(ours, expected, counts)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"step {step}")
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6, msg=f"step {step}")


def test_the_reference_rejects_other_budgets(one_layer):
    """Budgets one token off (13 + 3 instead of 12 + 4) fail the reference: the test sees the split."""
    tokens = prompt(80, seed=5)
    expected = reference(one_layer, tokens, "h2o", 40, 40)
    off = ratio_run(one_layer, tokens, "h2o", {"heavy_ratio": 0.325, "recent_ratio": 0.075}, 40, 40, lambda n: 16)
    assert max(float((a - b).abs().max()) for a, b in zip(off, expected)) > 1e-3


@pytest.mark.parametrize("method", ["h2o", "cam"])
def test_constant_physical_length_is_heavy_plus_recent(method):
    model = tiny_model(layers=2)
    tokens = prompt(150, seed=2)
    # 0.2 * 45 = 9 heavy + 0.1 * 45 = 4 recent (4.5 floored): 13 slots per layer at every step
    ratios = {"heavy_ratio": 0.2, "recent_ratio": 0.1}
    with pyramidkv.compress(model, method, **ratios), torch.no_grad():
        cache = model(tokens[:, :45]).past_key_values
        bytes_seen = set()
        for p in range(45, 150):
            model(tokens[:, p : p + 1], past_key_values=cache)
            assert cache.physical_lengths() == [13, 13], p
            bytes_seen.add(cache.nbytes())
    assert len(bytes_seen) == 1  # the decode buffer is never reallocated


def test_a_cache_above_the_prompt_grows_to_heavy_plus_recent_and_stays():
    """0.8 * 20 + 0.5 * 20 = 26 > 20: the prompt is kept whole, the cache grows to 26, then evicts."""
    model = tiny_model(layers=2)
    tokens = prompt(60, seed=4)
    ratio_run(model, tokens, "h2o", {"heavy_ratio": 0.8, "recent_ratio": 0.5}, 20, 40, lambda n: min(n, 26))


@pytest.mark.parametrize("method", ["h2o", "cam"])
def test_padded_rows_with_their_own_budgets_equal_single_runs(method):
    model = tiny_model(layers=2)
    rows = [prompt(47, seed=7), prompt(30, seed=8)]  # 9 + 4 = 13 and 6 + 3 = 9 slots
    ratios = {"heavy_ratio": 0.2, "recent_ratio": 0.1}
    singles = []
    for row, slots in zip(rows, (13, 9)):
        with pyramidkv.compress(model, method, **ratios):
            out = greedy(model, row, new_tokens=25)
        assert out.past_key_values.physical_lengths() == [slots, slots]
        singles.append(out)
    batch, mask = left_padded(rows)
    with pyramidkv.compress(model, method, **ratios):
        out = greedy(model, batch, new_tokens=25, attention_mask=mask)
    assert out.past_key_values.physical_lengths() == [13, 13]
    for index, single in enumerate(singles):
        assert torch.equal(out.sequences[index, batch.shape[1]:], single.sequences[0, rows[index].shape[1]:])
        for step, (a, b) in enumerate(zip(out.logits, single.logits)):
            torch.testing.assert_close(a[index], b[0], rtol=0, atol=1e-4, msg=f"row {index} step {step}")


def test_short_prompt_keeps_at_least_one_token():
    method = pyramidkv.build_method("h2o", heavy_ratio=0.1, recent_ratio=0.1)
    assert method.ratio_budgets(4) == (0, 1)  # both floor to 0: the newest token stays
    assert method.ratio_budgets(25) == (2, 2)
    assert pyramidkv.build_method("h2o", heavy_ratio=0.29, recent_ratio=0.1).ratio_budgets(100) == (29, 10)


@pytest.mark.parametrize("config,words", [
    ({"heavy_ratio": 0.0, "recent_ratio": 0.1}, "heavy_ratio=0.0 is invalid"),
    ({"heavy_ratio": 0.1, "recent_ratio": -0.2}, "recent_ratio=-0.2 is invalid"),
    ({"heavy_ratio": 1.5, "recent_ratio": 0.1}, "heavy_ratio=1.5 is invalid"),
    ({"heavy_ratio": True, "recent_ratio": 0.1}, "heavy_ratio=True is invalid"),
    ({"heavy_ratio": "0.1", "recent_ratio": 0.1}, "heavy_ratio='0.1' is invalid"),
    ({"heavy_ratio": 0.1}, "heavy_ratio=0.1 given without recent_ratio"),
    ({"recent_ratio": 0.1}, "recent_ratio=0.1 given without heavy_ratio"),
    ({"heavy_ratio": 0.1, "recent_ratio": 0.1, "max_cache_size": 64}, "max_cache_size=64 both size the cache"),
    ({"heavy_ratio": 0.1, "recent_ratio": 0.1, "window_size": 16}, "window_size=16 both size the cache"),
    ({"heavy_ratio": 0.1, "recent_ratio": 0.1, "max_capacity_prompt": 64}, "max_capacity_prompt=64 both"),
    ({"heavy_ratio": 0.1, "recent_ratio": 0.1, "keep_ratio": 0.5}, "keep_ratio=0.5 both size the cache"),
])
@pytest.mark.parametrize("method", ["h2o", "cam"])
def test_bad_ratio_settings_are_one_line_errors(method, config, words):
    with pytest.raises(ValueError) as err:
        pyramidkv.build_method(method, **config)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_subclass_without_the_decode_form_refuses_the_ratios():
    with pytest.raises(ValueError, match="PyramidInfer has no decode form; valid choices: H2O, CaM"):
        pyramidkv.build_method("pyramidinfer", heavy_ratio=0.1, recent_ratio=0.1)


def test_runner_flags():
    import argparse

    import run_ppl
    from pyramidkv import method_flags, predict

    parser = argparse.ArgumentParser()
    predict.add_common_args(parser)
    for spelling in ("--heavy_ratio", "--start_ratio"):  # CaM's spelling of the heavy budget
        args = parser.parse_args(["--method", "h2o", spelling, "0.1", "--recent_ratio", "0.2"])
        config = method_flags.method_config(args)
        assert config["heavy_ratio"] == 0.1 and config["recent_ratio"] == 0.2
        assert "max_capacity_prompt" not in config  # the default 128 is left out, as for compress_ratio
        pyramidkv.build_method(args.method, **config)  # window_size 8 (the default) is accepted
        assert method_flags.budget_name(args) == "heavy0.1_recent0.2"
    args = parser.parse_args(["--method", "h2o", "--heavy_ratio", "0.1", "--recent_ratio", "0.1",
                              "--max_capacity_prompts", "64"])
    with pytest.raises(ValueError, match="max_capacity_prompt=64 both size the cache"):
        pyramidkv.build_method(args.method, **method_flags.method_config(args))
    # run_ppl.py has no prompt to take a ratio of: CaM's spellings parse and are refused in one line
    args = run_ppl.build_parser().parse_args(["--method", "cam", "--start-ratio", "0.1", "--recent-ratio", "0.1"])
    assert (args.heavy_ratio, args.recent_ratio) == (0.1, 0.1)
    assert run_ppl.main(["--method", "cam", "--start_ratio", "0.1", "--recent_ratio", "0.1"]) == 2
    assert "\n" not in run_ppl.ratio_error(args)
