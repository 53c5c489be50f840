"""Compression while decoding: constant memory, and rolling StreamingLLM equals a masked full-cache run
at every step (generate and a manual loop, eager and sdpa, batch rows = single runs)."""

import pytest
import torch

import pyramidkv
from conftest import greedy, left_padded, prompt, tiny_model

PROMPT, CACHE, SINKS = 40, 16, 4


def rolling_oracle(model, token_ids, prompt_len, cache_size, sinks, padding=0):
    """Full-cache logits where query p >= prompt_len sees the sinks and the last cache_size - sinks
    tokens before it (what a rolling cache of cache_size holds after the previous step), plus itself;
    prompt queries see the whole causal prompt (prefill attention runs on the full K/V). `padding`
    leading pads are hidden and positions start after them."""
    length = token_ids.shape[1]
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    real_k = k - padding
    start = q - (cache_size - sinks)
    allowed = (k <= q) & (k >= padding) & ((q < prompt_len) | (real_k < sinks) | (k >= start))
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    positions = (torch.arange(length) - padding).clamp(min=0)[None]
    with torch.no_grad():
        return model(token_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_rolling_streamingllm_matches_masked_oracle(attn):
    model = tiny_model(attn=attn)
    with pyramidkv.compress(model, "streamingllm", sink_size=SINKS, max_cache_size=CACHE):
        out = greedy(model, prompt(PROMPT), new_tokens=30)
    assert out.past_key_values.physical_lengths() == [CACHE] * 3
    assert out.past_key_values.get_seq_length() == PROMPT + 29
    oracle = rolling_oracle(model, out.sequences, PROMPT, CACHE, SINKS)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], oracle[PROMPT - 1 + step], rtol=0, atol=1e-4)


def test_oracle_is_sharp():
    """A prefill-only StreamingLLM run (cache growing) does not match the rolling oracle."""
    model = tiny_model(attn="eager")
    with pyramidkv.compress(model, "streamingllm", sink_size=SINKS, max_capacity_prompt=CACHE):
        out = greedy(model, prompt(PROMPT), new_tokens=30)
    oracle = rolling_oracle(model, out.sequences, PROMPT, CACHE, SINKS)
    assert (out.logits[-1][0] - oracle[PROMPT + 28]).abs().max() > 1e-3


def test_manual_loop_short_prompt_grows_then_rolls():
    """A prompt shorter than the cache: nothing evicted until the cache fills, then one per step."""
    model = tiny_model(attn="eager")
    ids = prompt(6)
    lengths = []
    with pyramidkv.compress(model, "streamingllm", sink_size=SINKS, max_cache_size=CACHE), torch.no_grad():
        out = model(ids)
        cache, logits = out.past_key_values, [out.logits[0, -1]]
        for _ in range(30):
            token = logits[-1].argmax().view(1, 1)
            ids = torch.cat([ids, token], dim=1)
            out = model(token, past_key_values=cache)  # positions from the cache's true length
            logits.append(out.logits[0, -1])
            lengths.append(cache.physical_lengths()[0])
    assert lengths == [min(CACHE, 7 + i) for i in range(30)]
    oracle = rolling_oracle(model, ids, 6, CACHE, SINKS)
    for step, step_logits in enumerate(logits):
        torch.testing.assert_close(step_logits, oracle[5 + step], rtol=0, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,config", [("streamingllm", {"sink_size": SINKS}), ("h2o", {"window_size": 4}),
                                           ("tova", {}), ("cam", {"window_size": 4, "seed": 2})])
def test_padded_batch_rows_equal_single_runs(attn, method, config):
    model = tiny_model(attn=attn)
    long, short = prompt(PROMPT, seed=2), prompt(10, seed=3)  # the short row fills its cache while decoding
    batch, mask = left_padded([long, short])
    with pyramidkv.compress(model, method, max_cache_size=CACHE, **config):
        together = greedy(model, batch, new_tokens=20, attention_mask=mask)
        singles = [greedy(model, row, new_tokens=20) for row in (long, short)]
    assert max(together.past_key_values.physical_lengths()) <= CACHE
    for row, single in enumerate(singles):
        assert torch.equal(together.sequences[row, -20:], single.sequences[0, -20:])
        for ours, theirs in zip(together.logits, single.logits):
            torch.testing.assert_close(ours[row], theirs[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("method,config", [("streamingllm", {"sink_size": 4}), ("h2o", {"window_size": 8}),
                                           ("tova", {}), ("recent_only", {"window_size": 32, "skip_layers": ()}),
                                           ("cam", {"window_size": 8}), ("l2norm", {}), ("fix_size_l2", {"fix_kv_size": 32, "keep_ratio": 0.25, "skip_layers": ()})])
def test_constant_memory_over_1000_decode_steps(method, config):
    model = tiny_model(layers=2)
    decoding = {"compress_interval": 1} if method in ("recent_only", "fix_size_l2") else {"max_cache_size": 32}
    lengths, nbytes = [], []
    with pyramidkv.compress(model, method, **decoding, **config), torch.no_grad():
        out = model(prompt(20))
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(1000):
            out = model(token, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            lengths.append(max(cache.physical_lengths()))
            nbytes.append(cache.nbytes())
    assert max(lengths) <= 32 and lengths[-1] == 32
    assert cache.get_seq_length() == 1020
    assert len(set(nbytes[20:])) == 1  # flat once the cache is full: the buffer is never reallocated


def test_full_cache_grows_without_decode_compression():
    """The counterpart: the same loop with prefill-only compression grows by one slot per step."""
    model = tiny_model(layers=2)
    with pyramidkv.compress(model, "streamingllm", max_capacity_prompt=32), torch.no_grad():
        out = model(prompt(20))
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(50):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    assert cache.physical_lengths() == [70, 70]


def test_compress_interval_bounds_the_cache():
    model = tiny_model(layers=2)
    lengths = []
    with pyramidkv.compress(model, "streamingllm", max_cache_size=16, compress_interval=4), torch.no_grad():
        out = model(prompt(20))
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(12):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
            lengths.append(cache.physical_lengths()[0])
    assert lengths == [17, 18, 19, 16] * 3


@pytest.mark.parametrize("method,config,match", [
    ("snapkv", {"max_cache_size": 32}, "SnapKV has no decode-time form"),
    ("streamingllm", {"max_cache_size": 4, "sink_size": 4}, "max_cache_size=4 must be larger than sink_size=4"),
    ("h2o", {"max_cache_size": 8, "window_size": 8}, "max_cache_size=8 must be larger than window_size=8"),
    ("streamingllm", {"max_cache_size": 0}, "max_cache_size=0 is invalid"),
    ("streamingllm", {"compress_interval": -1}, "compress_interval=-1 is invalid"),
    ("streaming_llm", {"recent_size": 0}, "recent_size=0 is invalid"),
])
def test_bad_decode_settings_are_one_line_errors(method, config, match):
    with pytest.raises(ValueError, match=match) as err:
        pyramidkv.build_method(method, **config)
    assert "\n" not in str(err.value)
