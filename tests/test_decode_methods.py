"""Per-step references for the decode forms with scores (H2O as published, TOVA): a one-layer model
(one KV head, so each step's kept set is one set of positions) run unpatched with a 4-D mask of the
reference's kept set, whose eager attention weights drive the reference's evictions; the compressed
teacher-forced run must give the same logits at every step."""

import pytest
import torch

import pyramidkv
from conftest import prompt, tiny_model

CACHE, RECENT = 16, 4


def masked_forward(model, tokens, visible):
    """Logits and attention weights [Hq, len] of the last position, which sees only `visible`."""
    length = tokens.shape[1]
    allowed = torch.ones(length, length).tril().bool()
    allowed[-1] = False
    allowed[-1, visible] = True
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, output_attentions=True, use_cache=False)
    return out.logits[0, -1], out.attentions[0][0, :, -1]


def top_in_order(candidates, score, count):
    """The `count` candidates of highest score (ties: the earliest), in position order."""
    ranked = sorted(candidates, key=lambda pos: (-score[pos], pos))
    return sorted(ranked[:count])


def reference(model, tokens, policy, prompt_len, steps):
    with torch.no_grad():
        out = model(tokens[:, :prompt_len], output_attentions=True, use_cache=False)
    attention = out.attentions[0][0]  # [Hq, L, L]
    logits = [out.logits[0, -1]]
    positions = list(range(prompt_len))
    if policy == "h2o":  # prompt's column sums, heads averaged; keep heavy + recent
        accumulated = dict(enumerate(attention.sum(1).mean(0).tolist()))
        kept = top_in_order(positions[:-RECENT], accumulated, CACHE - RECENT) + positions[-RECENT:]
        kept = positions if prompt_len <= CACHE else kept
    else:  # TOVA: the last prompt query's attention; the last token kept
        last = dict(enumerate(attention[:, -1].mean(0).tolist()))
        kept = positions if prompt_len <= CACHE else top_in_order(positions[:-1], last, CACHE - 1) + positions[-1:]
    for p in range(prompt_len, prompt_len + steps - 1):
        visible = kept + [p]
        step_logits, weights = masked_forward(model, tokens[:, : p + 1], visible)
        logits.append(step_logits)
        weights = weights.mean(0)
        if policy == "h2o":
            accumulated[p] = 0.0
            for pos in visible:
                accumulated[pos] += float(weights[pos])
            if len(visible) > CACHE:
                kept = top_in_order(visible[:-RECENT], accumulated, CACHE - RECENT) + visible[-RECENT:]
            else:
                kept = visible
        else:
            current = {pos: float(weights[pos]) for pos in visible}
            kept = top_in_order(visible[:-1], current, CACHE - 1) + visible[-1:] if len(visible) > CACHE else visible
    return logits


def compressed_run(model, tokens, method, config, prompt_len, steps):
    with pyramidkv.compress(model, method, max_cache_size=CACHE, **config), torch.no_grad():
        out = model(tokens[:, :prompt_len])
        cache, logits = out.past_key_values, [out.logits[0, -1]]
        for p in range(prompt_len, prompt_len + steps - 1):
            out = model(tokens[:, p : p + 1], past_key_values=cache)
            logits.append(out.logits[0, -1])
            assert cache.physical_lengths() == [min(CACHE, p + 1)]
    return logits


@pytest.fixture
def one_layer():
    return tiny_model(attn="eager", layers=1, heads=2, kv_heads=1)


@pytest.mark.parametrize("prompt_len,steps", [(40, 30), (6, 60)])  # evicting at prefill / only while decoding
@pytest.mark.parametrize("method,config", [("h2o", {"window_size": RECENT}), ("tova", {})])
def test_decode_form_matches_per_step_reference(one_layer, method, config, prompt_len, steps):
    tokens = prompt(prompt_len + steps, seed=5)
    expected = reference(one_layer, tokens, method, prompt_len, steps)
    ours = compressed_run(one_layer, tokens, method, config, prompt_len, steps)
    for step, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"step {step}")


def test_references_are_sharp(one_layer):
    """The two policies keep different tokens: each reference rejects the other method's run."""
    tokens = prompt(66, seed=5)
    h2o, tova = reference(one_layer, tokens, "h2o", 6, 60), reference(one_layer, tokens, "tova", 6, 60)
    assert max(float((a - b).abs().max()) for a, b in zip(h2o, tova)) > 1e-3


def test_h2o_reference_needs_the_carried_sums(one_layer, monkeypatch):
    """An H2O that scores with the current step's attention only (no sums carried) fails the reference."""
    from pyramidkv.methods.base import group_mean
    from pyramidkv.methods.h2o import H2O

    def current_only(self, d):
        d.state["accumulated"] = group_mean(d.attention.sum(2), d.query.shape[1] // d.keys.shape[1])

    tokens = prompt(46, seed=5)
    expected = reference(one_layer, tokens, "h2o", 6, 40)
    monkeypatch.setattr(H2O, "decode_observe", current_only)
    ours = compressed_run(one_layer, tokens, "h2o", {"window_size": RECENT}, 6, 40)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, expected)) > 1e-2
