"""CS3602's kvcompress family: each function against a reference written from CS3602's description
(per layer, sorted indices), the function API (names, registry, errors), and the same methods inside a
model (the attention hook) equal to compressing the finished cache, padded rows = single runs."""

import math

import pytest
import torch
import torch.nn.functional as F

import pyramidkv
from pyramidkv import kvcompress
from conftest import greedy, prompt, tiny_model
from test_core_batch import left_padded
from test_core_errors import one_line_error

S, LAYERS = 40, 3


def random_cache(seed=0, batch=2, heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, S, dim, generator=g), torch.randn(batch, heads, S, dim, generator=g))
            for _ in range(LAYERS)]


def lowest_norm(keys, start, end, count):
    """Positions start..end-1 of the `count` lowest key norms, ascending, per [B, H]."""
    norms = keys[..., start:end, :].norm(dim=-1)
    return (norms.argsort(dim=-1)[..., :count] + start).sort(dim=-1).values


def span(keys, start, end):
    return torch.arange(start, end).expand(*keys.shape[:2], end - start)


def sinks_middle_recent(keys, size, sinks, recent):
    return torch.cat([span(keys, 0, sinks), lowest_norm(keys, sinks, S - recent, size - sinks - recent),
                      span(keys, S - recent, S)], dim=-1)


def reference(name, layer, keys, **cfg):
    """Kept positions [B, H, K] of CS3602's method, or None = the layer is kept whole."""
    skip = cfg.get("skip_layers", {"l2_compress": [0, 1], "fix_size_l2": [0, 1], "recent_only": [0, 1]}.get(name, []))
    if layer in skip:
        return None
    if name == "l2_compress":
        if S <= cfg.get("prune_after", 1000):
            return None
        return lowest_norm(keys, 0, S, math.ceil(cfg["keep_ratio"] * S))
    if name == "fix_size_l2":
        protected = int(cfg["fix_kv_size"] * cfg.get("keep_ratio", 0.0))
        order = -1 if cfg.get("strategy") == "keep_high" else 1
        norms = order * keys[..., : S - protected, :].norm(dim=-1)
        kept = norms.argsort(dim=-1)[..., : cfg["fix_kv_size"] - protected].sort(dim=-1).values
        return torch.cat([kept, span(keys, S - protected, S)], dim=-1)
    if name == "h2o_l2":
        size = cfg["start_size"] + cfg["heavy_hitter_size"] + cfg["recent_size"]
        return sinks_middle_recent(keys, size, cfg["start_size"], cfg["recent_size"])
    if name == "streaming_llm":
        return torch.cat([span(keys, 0, cfg["start_size"]), span(keys, S - cfg["recent_size"], S)], dim=-1)
    if name == "recent_only":
        return span(keys, S - cfg["window_size"], S)
    if name == "snapkv_lite":
        window, kernel = cfg["observation_window"], cfg.get("pooling_kernel", 5)
        norms = keys[..., : S - window, :].norm(dim=-1)
        importance = norms.max(dim=-1, keepdim=True).values + 1e-6 - norms
        pooled = F.avg_pool1d(importance.reshape(-1, 1, S - window), kernel, 1, kernel // 2)
        pooled = pooled[..., : S - window].reshape(importance.shape)
        top = pooled.topk(cfg["keep_size"] - window, dim=-1).indices.sort(dim=-1).values
        return torch.cat([top, span(keys, S - window, S)], dim=-1)
    if name == "pyramid_kv":
        size = max(int(cfg["base_size"] * cfg["layer_decay"] ** layer), cfg.get("min_size", 64))
        if size >= S:
            return None
        return sinks_middle_recent(keys, size, min(4, size // 8), size // 2)
    if name == "adaptive_l2":
        soft, hard, target = cfg["soft_limit"], cfg["hard_limit"], cfg["target_size"]
        if S <= soft:
            return None
        if S > hard:
            return sinks_middle_recent(keys, target, 4, target // 2)
        ratio = 0.9 - (S - soft) / (hard - soft) * (0.9 - 0.3)
        kept = max(int(S * ratio), soft)
        recent = int(kept * 0.2)
        return torch.cat([lowest_norm(keys, 0, S - recent, kept - recent), span(keys, S - recent, S)], dim=-1)
    raise AssertionError(name)


CASES = [
    ("l2_compress", {"keep_ratio": 0.4, "prune_after": 10}),
    ("l2_compress", {"keep_ratio": 0.4, "prune_after": 10, "skip_layers": [1]}),
    ("l2_compress", {"keep_ratio": 0.4}),  # prune_after 1000 > 40 tokens: nothing compressed
    ("fix_size_l2", {"fix_kv_size": 16, "keep_ratio": 0.25}),
    ("fix_size_l2", {"fix_kv_size": 16, "keep_ratio": 0.25, "strategy": "keep_high", "skip_layers": []}),
    ("h2o_l2", {"start_size": 4, "heavy_hitter_size": 6, "recent_size": 10}),
    ("streaming_llm", {"start_size": 4, "recent_size": 12}),
    ("streaming_llm", {"start_size": 4, "recent_size": 2}),
    ("recent_only", {"window_size": 10}),
    ("snapkv_lite", {"observation_window": 8, "keep_size": 20}),
    ("pyramid_kv", {"base_size": 32, "layer_decay": 0.5, "min_size": 8}),
    ("adaptive_l2", {"target_size": 16, "soft_limit": 8, "hard_limit": 30}),
    ("adaptive_l2", {"target_size": 16, "soft_limit": 20, "hard_limit": 60}),
]


@pytest.mark.parametrize("name,cfg", CASES)
def test_each_function_equals_the_reference(name, cfg):
    cache = random_cache()
    compressed = kvcompress.get_compress_fn(name)(cache, **cfg)
    assert isinstance(compressed, pyramidkv.CompressedCache)
    for layer, ((keys, values), stored) in enumerate(zip(cache, compressed.layers)):
        keep = reference(name, layer, keys, **cfg)
        if keep is None:
            assert torch.equal(stored.keys, keys)
            continue
        index = keep[..., None].expand(-1, -1, -1, keys.shape[-1])
        assert torch.equal(stored.keys, keys.gather(2, index)), (layer, stored.keys.shape, keep.shape)
        assert torch.equal(stored.values, values.gather(2, index))
        assert stored.get_seq_length() == S  # true length kept: positions stay right


def test_random_strategy_is_seeded_and_keeps_the_protected_tail():
    cache = random_cache()
    first = kvcompress.fix_size_l2_compress(cache, fix_kv_size=16, keep_ratio=0.25, strategy="random", seed=3)
    again = kvcompress.fix_size_l2_compress(cache, fix_kv_size=16, keep_ratio=0.25, strategy="random", seed=3)
    other = kvcompress.fix_size_l2_compress(cache, fix_kv_size=16, keep_ratio=0.25, strategy="random", seed=4)
    layer = first.layers[2]
    assert torch.equal(layer.keys, again.layers[2].keys) and not torch.equal(layer.keys, other.layers[2].keys)
    assert torch.equal(layer.keys[:, :, -4:], cache[2][0][:, :, -4:])


def test_registry_and_function_names():
    assert kvcompress.list_methods() == ["l2_compress", "fix_size_l2", "streaming_llm", "h2o_l2", "snapkv_lite",
                                         "pyramid_kv", "adaptive_l2", "recent_only"]
    assert kvcompress.get_compress_fn("streaming_llm") is kvcompress.streaming_llm_compress
    assert pyramidkv.kvcompress.recent_only_compress.__name__ == "recent_only_compress"
    one_line_error(lambda: kvcompress.get_compress_fn("h2o"), "'h2o'", "h2o_l2", "recent_only")
    for name in kvcompress.list_methods():  # every name also works as a pyramidkv method
        pyramidkv.build_method(name)
    assert pyramidkv.canonical_name("Streaming_LLM") == "streaming_llm"


def test_parameter_aliases_build_streamingllm():
    method = pyramidkv.build_method("streaming_llm", start_size=4, recent_size=508)
    assert type(method).__name__ == "StreamingLLM" and method.sink_size == 4 and method.max_capacity_prompt == 512
    recent = pyramidkv.build_method("recent_only", window_size=64)
    assert recent.sink_size == 0 and recent.max_capacity_prompt == 64 and recent.skip_layers == (0, 1)
    one_line_error(lambda: pyramidkv.build_method("streaming_llm", heavy_hitter_size=3), "heavy_hitter_size", "start_size")


def test_bad_input():
    one_line_error(lambda: pyramidkv.build_method("fix_size_l2", strategy="keep_mid"), "'keep_mid'", "keep_low",
                   "keep_high", "random")
    for size in (0, -5):
        one_line_error(lambda: pyramidkv.build_method("fix_size_l2", fix_kv_size=size), f"fix_kv_size={size}", "positive")
    one_line_error(lambda: pyramidkv.build_method("h2o_l2", max_capacity_prompt=128), "max_capacity_prompt=128",
                   "heavy_hitter_size")
    one_line_error(lambda: pyramidkv.build_method("pyramid_kv", profile="cubic"), "'cubic'", "exponential")
    one_line_error(lambda: pyramidkv.build_method("adaptive_l2", soft_limit=600, hard_limit=500), "soft_limit=600")
    one_line_error(lambda: pyramidkv.build_method("l2_compress", skip_layers="0,1"), "skip_layers='0,1'")
    one_line_error(lambda: pyramidkv.compress_cache(random_cache(), "SimCalKV"), "SimCalKV", "queries", "l2_compress")
    one_line_error(lambda: pyramidkv.compress_cache("cache", "l2_compress"), "str", "DynamicCache")


@pytest.mark.parametrize("name,cfg", [("h2o_l2", {"start_size": 2, "heavy_hitter_size": 6, "recent_size": 8}),
                                      ("snapkv_lite", {"observation_window": 4, "keep_size": 16}),
                                      ("pyramid_kv", {"base_size": 24, "layer_decay": 0.7, "min_size": 8})])
def test_in_a_model_equals_compressing_the_finished_cache(name, cfg):
    model = tiny_model()
    input_ids = prompt(40)
    with pyramidkv.compress(model, name, **cfg):
        hooked = greedy(model, input_ids, new_tokens=1).past_key_values
    full = model(input_ids, use_cache=True).past_key_values  # unpatched: a DynamicCache
    after = pyramidkv.compress_cache(full, name, **cfg)
    assert hooked.kept_tokens() == after.kept_tokens()
    for ours, theirs in zip(hooked.layers, after.layers):
        kept = theirs.physical_length
        torch.testing.assert_close(ours.keys[:, :, :kept], theirs.keys, rtol=0, atol=1e-5)


def test_decoding_from_a_compressed_finished_cache_keeps_true_positions():
    model = tiny_model()
    input_ids = prompt(40)
    with pyramidkv.compress(model, "streaming_llm", start_size=4, recent_size=12):
        hooked = greedy(model, input_ids, new_tokens=4)
    full = model(input_ids, use_cache=True).past_key_values
    cache = kvcompress.streaming_llm_compress(full, start_size=4, recent_size=12)
    first = hooked.sequences[:, 40:41]
    with pyramidkv.compress(model, "fullkv"):
        resumed = greedy(model, torch.cat([input_ids, first], dim=1), new_tokens=3, past_key_values=cache)
    assert torch.equal(resumed.sequences, hooked.sequences)


@pytest.mark.parametrize("name,cfg", [("fix_size_l2", {"fix_kv_size": 16, "keep_ratio": 0.25, "strategy": "random"}),
                                      ("adaptive_l2", {"target_size": 16, "soft_limit": 10, "hard_limit": 40}),
                                      ("snapkv_lite", {"observation_window": 4, "keep_size": 16})])
def test_padded_rows_equal_single_runs(name, cfg):
    model = tiny_model()
    rows = [prompt(length, seed=length) for length in (50, 31, 14)]
    ids, mask = left_padded(rows)
    with pyramidkv.compress(model, name, skip_layers=[0], **cfg):
        batched = greedy(model, ids, attention_mask=mask)
        singles = [greedy(model, row) for row in rows]
    per_row = batched.past_key_values.kept_tokens_per_row()
    for b, single in enumerate(singles):
        assert [layer[b] for layer in per_row] == single.past_key_values.kept_tokens()
        for batch_logits, single_logits in zip(batched.logits, single.logits):
            torch.testing.assert_close(batch_logits[b], single_logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,cfg", [("l2_compress", {"keep_ratio": 0.5, "prune_after": 64}),
                                      ("h2o_l2", {"start_size": 4, "heavy_hitter_size": 30, "recent_size": 30}),
                                      ("adaptive_l2", {}), ("pyramid_kv", {"base_size": 64, "min_size": 64}),
                                      ("recent_only", {"window_size": 64})])
def test_budget_not_below_the_prompt_equals_unpatched(name, cfg):
    model = tiny_model()
    input_ids = prompt(40)
    reference = greedy(model, input_ids)
    with pyramidkv.compress(model, name, **cfg):
        patched = greedy(model, input_ids)
    assert torch.equal(patched.sequences, reference.sequences)
    for ours, theirs in zip(patched.logits, reference.logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_compressed_finished_cache_on_an_unpatched_model_says_how_to_decode():
    model = tiny_model()
    cache = kvcompress.h2o_l2_compress(model(prompt(40), use_cache=True).past_key_values, start_size=2,
                                       heavy_hitter_size=4, recent_size=8)
    one_line_error(lambda: model(prompt(1, seed=3), past_key_values=cache), "compress_cache",
                   "pyramidkv.compress(model, 'fullkv')")
