"""The README's code runs as written (with a tiny local checkpoint in place of the hub id)."""

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import pyramidkv
from conftest import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "meta-llama/Meta-Llama-3-8B-Instruct"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def save_tiny_checkpoint(directory):
    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(95)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    tiny_model().save_pretrained(directory)


def test_readme_usage_examples_run(tmp_path):
    save_tiny_checkpoint(tmp_path)
    usage, scoped, new_method = python_blocks()[:3]
    namespace = {"long_prompt": " ".join(f"w{i % 90 + 3}" for i in range(300))}
    exec(usage.replace(HUB_ID, str(tmp_path)), namespace)
    assert namespace["out"].shape[1] == 300 + 64
    exec(scoped, namespace)
    assert namespace["out"].past_key_values.kept_tokens() == [256, 256, 256]

    exec(new_method, namespace)
    try:
        assert "KeyMagnitude" in pyramidkv.list_methods()
        with pyramidkv.compress(namespace["model"], "keymagnitude", max_capacity_prompt=32):
            out = namespace["model"].generate(torch.randint(3, 90, (1, 100)), max_new_tokens=2, do_sample=False,
                                              return_dict_in_generate=True)
        assert out.past_key_values.kept_tokens() == [32, 32, 32]
    finally:
        del pyramidkv.METHODS["KeyMagnitude"]
