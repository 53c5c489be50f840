"""Ratio budgets (compress_ratio / keep_ratio) for every method, resolved per row, and the bad-input
errors of issue 18."""

import pytest
import torch

import pyramidkv
from conftest import greedy, prompt, tiny_model
from test_core_batch import left_padded
from test_core_errors import one_line_error


@pytest.mark.parametrize("method", ["SnapKV", "H2O", "L2Norm", "StreamingLLM", "ChunkKV", "SimCalKV", "CaM"])
def test_keep_ratio_and_compress_ratio_keep_the_same_tokens(method):
    removed = pyramidkv.build_method(method, compress_ratio=0.4)
    kept = pyramidkv.build_method(method, keep_ratio=0.6)
    for length in (10, 37, 100, 1001):
        assert removed.layer_budgets(length, 3)[-1] == kept.layer_budgets(length, 3)[-1]
    assert kept.capacity(10) == 6 and kept.capacity(37) == 23 and kept.capacity(1) == 1  # ceil(0.6 n)


def test_pyramidkv_schedule_from_a_ratio_is_the_schedule_of_that_many_tokens():
    ratio = pyramidkv.build_method("PyramidKV", keep_ratio=0.25)
    tokens = pyramidkv.build_method("PyramidKV", max_capacity_prompt=50)
    assert ratio.layer_budgets(200, 4) == tokens.layer_budgets(200, 4)
    assert sum(ratio.layer_budgets(200, 4)) == 4 * 50


@pytest.mark.parametrize("method", ["SnapKV", "PyramidKV", "SimCalKV"])
def test_ratio_budgets_in_a_padded_batch_equal_single_runs(method):
    model = tiny_model()
    rows = [prompt(length, seed=length) for length in (60, 33, 18)]
    ids, mask = left_padded(rows)
    with pyramidkv.compress(model, method, keep_ratio=0.5, window_size=4):
        batched = greedy(model, ids, attention_mask=mask)
        singles = [greedy(model, row) for row in rows]
    per_row = batched.past_key_values.kept_tokens_per_row()
    for b, single in enumerate(singles):
        assert [layer[b] for layer in per_row] == single.past_key_values.kept_tokens()
        for batch_logits, single_logits in zip(batched.logits, single.logits):
            torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)
    assert [layer[0] for layer in per_row][-1] != [layer[1] for layer in per_row][-1]  # budgets differ by row


def test_replacing_the_budget_of_a_built_method():
    built = pyramidkv.build_method("snapkv", max_capacity_prompt=64)
    assert pyramidkv.build_method(built, keep_ratio=0.3).max_capacity_prompt is None
    assert pyramidkv.build_method(pyramidkv.build_method("snapkv", keep_ratio=0.3), max_capacity_prompt=32).keep_ratio is None
    assert pyramidkv.build_method("snapkv").max_capacity_prompt == 128  # no budget given: the default


def test_both_a_budget_and_a_ratio():
    one_line_error(lambda: pyramidkv.build_method("snapkv", max_capacity_prompt=64, compress_ratio=0.4),
                   "max_capacity_prompt=64", "compress_ratio=0.4", "keep_ratio")
    one_line_error(lambda: pyramidkv.build_method("simcalkv", compress_ratio=0.4, keep_ratio=0.6),
                   "compress_ratio=0.4", "keep_ratio=0.6")


@pytest.mark.parametrize("field", ["compress_ratio", "keep_ratio"])
@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, float("nan"), True, "0.5"])
def test_ratio_outside_zero_one(field, value):
    one_line_error(lambda: pyramidkv.build_method("simcalkv", **{field: value}), f"{field}={value!r}", "between 0 and 1")


@pytest.mark.parametrize("method", ["SimCalKV", "KeepKV"])
@pytest.mark.parametrize("value", [1.5, -1.01, float("nan"), "0.8"])
def test_sim_threshold_outside_minus_one_one(method, value):
    one_line_error(lambda: pyramidkv.build_method(method, sim_threshold=value), f"sim_threshold={value!r}", "[-1, 1]")


def test_unknown_calibration_and_bad_cam_settings():
    one_line_error(lambda: pyramidkv.build_method("simcalkv", calibration="approx"), "'approx'", "exact", "released")
    one_line_error(lambda: pyramidkv.build_method("cam", merge_window=0), "merge_window=0")
    one_line_error(lambda: pyramidkv.build_method("pyramidinfer", layer_step=-0.01), "layer_step=-0.01")
