"""The per-slot logit bias: a slot with bias ln n attends like n identical copies of that slot."""

import copy
import math

import pytest
import torch

import pyramidkv
from conftest import prompt, tiny_model


def _prefilled(model, input_ids):
    """A CompressedCache holding the whole prompt (FullKV) after one forward."""
    with torch.no_grad(), pyramidkv.compress(model, "fullkv"):
        cache = pyramidkv.CompressedCache("fullkv", model.config)
        model(input_ids, past_key_values=cache)
    return cache


def _with_copies(cache, slot, copies):
    """The same cache with `slot` stored `copies` times in every layer (true length grows to match)."""
    duplicated = copy.deepcopy(cache)
    for layer in duplicated.layers:
        repeat = [layer.keys[:, :, slot : slot + 1]] * (copies - 1)
        layer.keys = torch.cat([layer.keys[:, :, : slot + 1], *repeat, layer.keys[:, :, slot + 1 :]], dim=2)
        repeat = [layer.values[:, :, slot : slot + 1]] * (copies - 1)
        layer.values = torch.cat([layer.values[:, :, : slot + 1], *repeat, layer.values[:, :, slot + 1 :]], dim=2)
        layer._key_buffer = layer._value_buffer = None
        layer.cumulative_length += copies - 1
    return duplicated


def _with_bias(cache, slot, copies):
    biased = copy.deepcopy(cache)
    for layer in biased.layers:
        bias = torch.zeros(layer.keys.shape[:3])
        bias[:, :, slot] = math.log(copies)
        layer.slot_bias = bias
    return biased


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_slot_with_bias_ln_n_equals_n_copies(attn, new_tokens):
    model = tiny_model(attn=attn)
    input_ids, follow = prompt(20), prompt(new_tokens, seed=7)
    cache = _prefilled(model, input_ids)
    slot, copies = 5, 4
    positions = torch.arange(20, 20 + new_tokens)[None]
    with torch.no_grad(), pyramidkv.compress(model, "fullkv"):
        biased = model(follow, past_key_values=_with_bias(cache, slot, copies), position_ids=positions).logits
        copied = model(follow, past_key_values=_with_copies(cache, slot, copies), position_ids=positions).logits
        plain = model(follow, past_key_values=copy.deepcopy(cache), position_ids=positions).logits
    torch.testing.assert_close(biased, copied, rtol=0, atol=1e-5)
    assert (biased - plain).abs().max() > 1e-3  # the bias does change the output


def test_bias_covers_prefill_slots_and_decode_slots_read_zero():
    model = tiny_model()
    cache = _with_bias(_prefilled(model, prompt(20)), 5, 3)
    layer = cache.layers[0]
    with torch.no_grad(), pyramidkv.compress(model, "fullkv"):
        model(prompt(2, seed=3), past_key_values=cache, position_ids=torch.tensor([[20, 21]]))
    bias = layer.attention_bias()
    assert bias.shape[-1] == layer.physical_length == 22
    assert torch.equal(bias[..., 20:], torch.zeros_like(bias[..., 20:]))
    assert torch.allclose(bias[..., 5], torch.full_like(bias[..., 5], math.log(3)))
    layer.crop(-4)
    assert layer.slot_bias.shape[-1] == 18


def test_bias_follows_beam_reordering_and_repeats():
    model = tiny_model()
    cache = _prefilled(model, prompt(10, batch=2))
    for layer in cache.layers:
        layer.slot_bias = torch.arange(2 * 2 * 10, dtype=torch.float32).view(2, 2, 10)
    layer = cache.layers[1]
    first_row = layer.slot_bias[0].clone()
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.slot_bias[1], first_row)
    layer.batch_repeat_interleave(2)
    assert layer.slot_bias.shape[0] == 4 and torch.equal(layer.slot_bias[3], first_row)
    layer.batch_select_indices(torch.tensor([3]))
    assert torch.equal(layer.slot_bias[0], first_row)


def test_flash_attention_2_with_a_bias_method_is_a_one_line_error():
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError) as info:
        with pyramidkv.compress(model, "simcalkv", compress_ratio=0.4):
            pass
    message = str(info.value)
    assert "\n" not in message and "eager" in message and "sdpa" in message and "SimCalKV" in message
    # the released calibration stores no bias: flash is fine as far as the bias goes
    from pyramidkv.patch import check_attention_implementation
    method = pyramidkv.build_method("simcalkv", compress_ratio=0.4, calibration="released")
    assert not method.uses_logit_bias
    try:
        check_attention_implementation(model.config, method)
    except ValueError as err:  # only the missing flash-attn package may be reported
        assert "flash-attn" in str(err)


def test_bias_reaches_the_query_heads_of_its_kv_head_and_keeps_masked_columns_masked():
    from pyramidkv.patch import _add_slot_bias

    bias = torch.tensor([[[1.0, 2.0, 0.0], [5.0, 6.0, 0.0]]])  # 1 row, 2 stored (KV) heads, 3 slots
    query, key = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4, 8)  # 4 query heads, 2 queries, 4 columns
    out = _add_slot_bias(None, bias, query, key)  # no mask given: causal for the last 2 positions
    low = torch.finfo(torch.float32).min
    assert out.shape == (1, 4, 2, 4)
    for head, expected in enumerate([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [5.0, 6.0, 0.0], [5.0, 6.0, 0.0]]):
        assert out[0, head, 1, :3].tolist() == expected and out[0, head, 1, 3] == 0  # decode column: 0
        assert out[0, head, 0, 3] == low  # the first query does not see the last column
    shared = torch.tensor([[True, False, True, True]])[None, None]  # a bool mask hiding column 1
    assert _add_slot_bias(shared, bias, query, key)[0, 2, 0, 1] == low
