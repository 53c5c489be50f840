"""pos_shift=True (positions by cache slot, StreamingLLM/CaM --enable_pos_shift): oracles.

One layer: its K/V depend only on the token and its position, so a step of a pos_shift cache must equal
a FRESH unpatched run over the tokens the cache holds plus the new one, at positions 0..K. Two layers
with layer 0 kept whole (skip_layers, prefill-only compression): layer 1 holds fewer tokens than layer
0, so it must shift the step's query to its own next rank; the oracle runs the model's own layer 1 on the full model's layer-0
outputs of the held tokens at positions 0..K."""

import pytest
import torch

import pyramidkv
from pyramidkv.pos_shift import rotate
from conftest import greedy, left_padded, prompt, tiny_model

PROMPT, CACHE, SINKS = 40, 16, 4


def held_before(p):
    """Tokens a rolling StreamingLLM cache of CACHE holds when token p arrives (p >= PROMPT)."""
    return list(range(SINKS)) + list(range(p - (CACHE - SINKS), p))


def fresh_logits(model, tokens, positions):
    with torch.no_grad():
        return model(tokens[:, positions], position_ids=torch.arange(len(positions))[None], use_cache=False).logits[0, -1]


def test_rotations_compose_like_the_models_rope():
    model = tiny_model()
    rotary = model.model.rotary_emb
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    states = torch.randn(1, 2, 5, 16)
    at = lambda p: rotary(states, torch.tensor([p]))  # noqa: E731
    cos3, sin3 = (t[:, None] for t in at([3] * 5))
    cos10, sin10 = (t[:, None] for t in at([10] * 5))
    k3 = states * cos3 + torch.cat([-states[..., 8:], states[..., :8]], -1) * sin3
    k10 = states * cos10 + torch.cat([-states[..., 8:], states[..., :8]], -1) * sin10
    assert apply_rotary_pos_emb(states, states, cos3[:, 0], sin3[:, 0])[0].allclose(k3, atol=1e-6)
    torch.testing.assert_close(rotate(k3, torch.tensor(7), rotary.inv_freq), k10, rtol=0, atol=1e-5)
    torch.testing.assert_close(rotate(k10, torch.full((1, 2, 5), -7), rotary.inv_freq), k3, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_one_layer_rolling_equals_a_fresh_run_over_the_held_tokens(attn):
    model = tiny_model(layers=1, attn=attn)
    with pyramidkv.compress(model, "streamingllm", sink_size=SINKS, max_cache_size=CACHE, pos_shift=True):
        out = greedy(model, prompt(PROMPT), new_tokens=30)
    tokens = out.sequences
    torch.testing.assert_close(out.logits[0][0], fresh_logits(model, tokens, list(range(PROMPT))), rtol=0, atol=1e-4)
    for step in range(1, 30):
        p = PROMPT + step - 1  # the token fed at this step
        expected = fresh_logits(model, tokens, held_before(p) + [p])
        torch.testing.assert_close(out.logits[step][0], expected, rtol=0, atol=1e-4)


def test_the_oracle_is_sharp_true_positions_differ():
    model = tiny_model(layers=1, attn="eager")
    with pyramidkv.compress(model, "streamingllm", sink_size=SINKS, max_cache_size=CACHE):
        out = greedy(model, prompt(PROMPT), new_tokens=10)
    p = PROMPT + 8
    assert (out.logits[9][0] - fresh_logits(model, out.sequences, held_before(p) + [p])).abs().max() > 1e-3


def test_positions_stay_inside_the_cache():
    model = tiny_model(layers=2)
    with pyramidkv.compress(model, "streamingllm", sink_size=SINKS, max_cache_size=CACHE, pos_shift=True), \
            torch.no_grad():
        cache = model(prompt(PROMPT)).past_key_values
        token = torch.tensor([[5]])
        for _ in range(100):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        assert int(cache.pos_shift_positions.max()) == CACHE  # the new token's slot; the true position is 140
        assert cache.get_seq_length() == PROMPT + 100


def test_a_layer_holding_fewer_tokens_shifts_its_query():
    model = tiny_model(layers=2, attn="eager")
    # prefill-only StreamingLLM: layer 0 skipped (whole, 40 tokens), layer 1 keeps the sinks + the last
    # CACHE - SINKS prompt tokens and then grows: its ranks trail layer 0's (true) positions by 24
    method = dict(sink_size=SINKS, max_capacity_prompt=CACHE, skip_layers=[0], pos_shift=True)
    with pyramidkv.compress(model, "streamingllm", **method):
        out = greedy(model, prompt(PROMPT), new_tokens=12)
    tokens = out.sequences
    with torch.no_grad():
        # layer 0 is whole at true positions = the full model's; its outputs are layer 1's inputs
        hidden = model(tokens, output_hidden_states=True, use_cache=False).hidden_states[1]
        decoder = model.model
        for step in range(1, 12):
            p = PROMPT + step - 1
            held = held_before(PROMPT) + list(range(PROMPT, p + 1))
            h = hidden[:, held]
            positions = torch.arange(len(held))[None]
            mask = torch.full((len(held), len(held)), float("-inf")).triu(1)[None, None]
            h = decoder.layers[1](h, attention_mask=mask, position_ids=positions,
                                  position_embeddings=decoder.rotary_emb(h, positions))
            h = h[0] if isinstance(h, tuple) else h
            expected = model.lm_head(decoder.norm(h))[0, -1]
            torch.testing.assert_close(out.logits[step][0], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method,config", [("streamingllm", {"sink_size": SINKS, "max_cache_size": CACHE}),
                                           ("snapkv", {"max_capacity_prompt": CACHE, "window_size": 4}),
                                           ("h2o", {"max_cache_size": CACHE, "window_size": 4})])
def test_padded_batch_rows_equal_single_runs(method, config):
    model = tiny_model()
    long, short = prompt(PROMPT, seed=2), prompt(10, seed=3)
    batch, mask = left_padded([long, short])
    with pyramidkv.compress(model, method, pos_shift=True, **config):
        together = greedy(model, batch, new_tokens=20, attention_mask=mask)
        singles = [greedy(model, row, new_tokens=20) for row in (long, short)]
    for row, single in enumerate(singles):
        assert torch.equal(together.sequences[row, -20:], single.sequences[0, -20:])
        for ours, theirs in zip(together.logits, single.logits):
            torch.testing.assert_close(ours[row], theirs[0], rtol=0, atol=1e-4)


def test_merging_methods_refuse_pos_shift():
    with pytest.raises(ValueError, match="pos_shift=True needs each kept slot's prompt position, which SimCalKV"):
        pyramidkv.build_method("simcalkv", pos_shift=True)


def test_quantized_storage_refuses_pos_shift():
    with pytest.raises(ValueError, match="pos_shift=True re-rotates dense stored keys"):
        pyramidkv.build_method("snapkv", pos_shift=True, quant_method="kivi")


def test_per_head_storage_refuses_pos_shift_naming_its_storage():
    with pytest.raises(ValueError, match="pos_shift=True re-rotates dense stored keys; AdaKV"):
        pyramidkv.build_method("adakv", pos_shift=True)
