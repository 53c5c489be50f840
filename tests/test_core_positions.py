"""Invariant 3: kept tokens keep their TRUE positions.

StreamingLLM keeps a set known in advance (sinks + recent tokens), so a full-cache run whose 4-D mask
hides the evicted prompt tokens from every later query is an exact oracle for the compressed run.
"""

import pytest
import torch

import pyramidkv
from conftest import greedy, prompt, tiny_model

PROMPT, BUDGET, SINKS = 100, 32, 4


def kept_positions():
    return set(range(SINKS)) | set(range(PROMPT - (BUDGET - SINKS), PROMPT))


def oracle_logits(model, token_ids):
    """Full-cache logits where queries after the prompt see only the kept prompt tokens."""
    length = token_ids.shape[1]
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    kept = torch.zeros(length, dtype=torch.bool)
    kept[sorted(kept_positions())] = True
    allowed = (k <= q) & ((q < PROMPT) | (k >= PROMPT) | kept[None, :])
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return model(token_ids, attention_mask=mask, use_cache=False).logits[0]


@pytest.fixture
def model():
    return tiny_model(attn="eager")


def test_generate_matches_masked_full_cache_oracle(model):
    with pyramidkv.compress(model, "streamingllm", max_capacity_prompt=BUDGET, sink_size=SINKS):
        out = greedy(model, prompt(PROMPT), new_tokens=6)
    assert sorted(out.past_key_values.kept_tokens()) == [BUDGET] * 3
    oracle = oracle_logits(model, out.sequences)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], oracle[PROMPT - 1 + step], rtol=0, atol=1e-4)


def test_second_generate_on_reused_cache(model):
    with pyramidkv.compress(model, "streamingllm", max_capacity_prompt=BUDGET, sink_size=SINKS):
        first = greedy(model, prompt(PROMPT), new_tokens=4)
        follow_up = torch.cat([first.sequences, prompt(5, seed=7)], dim=1)
        second = greedy(model, follow_up, new_tokens=4, past_key_values=first.past_key_values)
    assert second.past_key_values.get_seq_length() == follow_up.shape[1] + 3
    oracle = oracle_logits(model, second.sequences)
    for step, logits in enumerate(second.logits):
        torch.testing.assert_close(logits[0], oracle[follow_up.shape[1] - 1 + step], rtol=0, atol=1e-4)


def test_manual_decode_loop_without_position_ids(model):
    ids = prompt(PROMPT)
    with pyramidkv.compress(model, "streamingllm", max_capacity_prompt=BUDGET, sink_size=SINKS), torch.no_grad():
        out = model(ids)
        cache, logits = out.past_key_values, [out.logits[0, -1]]
        for _ in range(5):
            next_token = logits[-1].argmax().view(1, 1)
            ids = torch.cat([ids, next_token], dim=1)
            out = model(next_token, past_key_values=cache)  # positions come from the cache's true length
            logits.append(out.logits[0, -1])
    assert cache.physical_lengths() == [BUDGET + 5] * 3
    oracle = oracle_logits(model, ids)
    for step, step_logits in enumerate(logits):
        torch.testing.assert_close(step_logits, oracle[PROMPT - 1 + step], rtol=0, atol=1e-4)


def test_oracle_detects_wrong_positions(model):
    """The oracle is sharp: a full-cache decode (nothing hidden) does not match it."""
    out = greedy(model, prompt(PROMPT), new_tokens=3)
    oracle = oracle_logits(model, out.sequences)
    assert (out.logits[1][0] - oracle[PROMPT]).abs().max() > 1e-3
