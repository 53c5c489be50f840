"""Tiny random-weight models built from configs (no hub access)."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
MODELS = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}

import pyramidkv

# tiny models decode faster on one thread, and the suite shares 2 cores with whatever else runs
torch.set_num_threads(1)

VOCAB = 97


def tiny_config(family="llama", layers=3, heads=4, kv_heads=2, attn="sdpa", **overrides):
    config_class = CONFIGS[family]
    config = config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **overrides,
    )
    config._attn_implementation = attn
    return config


def tiny_model(family="llama", seed=0, **kwargs):
    torch.manual_seed(seed)
    model_class = MODELS[family]
    model = model_class(tiny_config(family, **kwargs)).eval()
    # random weights give flat logits; a larger output scale makes greedy choices well separated
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def prompt(length, batch=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def greedy(model, input_ids, new_tokens=6, **kwargs):
    return model.generate(
        input_ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def assert_same_generation(ref, out, rel=1e-4):
    """Two model.generate outputs (output_logits=True): the same tokens, and every step's logits within
    `rel` of the reference's largest logit."""
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        assert ((a - b).abs().max() / a.abs().max()).item() < rel


@pytest.fixture(autouse=True)
def _undo_patches():
    yield
    pyramidkv.restore()


def left_padded(rows):
    """Rows [1, n_i] -> (batch [B, max n] left-padded with 0, attention mask)."""
    width = max(row.shape[1] for row in rows)
    batch = torch.cat([torch.cat([torch.zeros(1, width - row.shape[1], dtype=torch.long), row], dim=1) for row in rows])
    mask = torch.ones_like(batch)
    for index, row in enumerate(rows):
        mask[index, : width - row.shape[1]] = 0
    return batch, mask


def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
