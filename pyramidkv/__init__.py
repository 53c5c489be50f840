"""pyramidkv: KV-cache compression for Hugging Face transformers 5.x.

    from pyramidkv import replace_llama
    replace_llama("pyramidkv", max_capacity_prompt=128)   # or pyramidkv.replace(...): every family
    model = AutoModelForCausalLM.from_pretrained(...)
    model.generate(...)          # prefill compressed with observation-window attention

or, for one model only:

    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=128):
        model.generate(...)
"""

import logging

from .cache import CompressedCache, CompressedLayer
from .methods import METHODS, KVMethod, PrefillInputs, build_method, canonical_name, list_methods, register_method
from .patch import compress, replace, replace_llama, replace_mistral, replace_qwen2, replace_qwen3, restore

__version__ = "0.1.0"

logging.getLogger("pyramidkv").addHandler(logging.NullHandler())

__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "KVMethod",
    "METHODS",
    "PrefillInputs",
    "build_method",
    "canonical_name",
    "compress",
    "list_methods",
    "register_method",
    "replace",
    "replace_llama",
    "replace_mistral",
    "replace_qwen2",
    "replace_qwen3",
    "restore",
]
