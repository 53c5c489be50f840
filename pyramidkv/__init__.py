"""pyramidkv: KV-cache compression for Hugging Face transformers 5.x.

    from pyramidkv import replace_llama
    replace_llama("pyramidkv", max_capacity_prompt=128)   # or pyramidkv.replace(...): every family
    model = AutoModelForCausalLM.from_pretrained(...)
    model.generate(...)          # prefill compressed with observation-window attention

or, for one model only:

    with pyramidkv.compress(model, "snapkv", max_capacity_prompt=128):   # or compress_ratio=0.4 / keep_ratio=0.6
        model.generate(...)

A finished cache, after the fact (key-only methods; CS3602's function API in pyramidkv.kvcompress):

    compressed = pyramidkv.compress_cache(past_key_values, "h2o_l2", heavy_hitter_size=64)
"""

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger("pyramidkv").addHandler(logging.NullHandler())

# Public names resolve lazily (PEP 562) so that `from pyramidkv import predict` and the runners'
# `--help` do not import torch/transformers (~5 s); the first use of any name below imports its module.
_LAZY = {
    "CompressedCache": "cache",
    "CompressedLayer": "cache",
    "KVMethod": "methods",
    "METHODS": "methods",
    "PrefillInputs": "methods",
    "build_method": "methods",
    "canonical_name": "methods",
    "config_keys": "methods",
    "compress_cache": "kvcompress",
    "list_methods": "methods",
    "register_method": "methods",
    "compress": "patch",
    "replace": "patch",
    "replace_llama": "patch",
    "replace_mistral": "patch",
    "replace_qwen2": "patch",
    "replace_qwen3": "patch",
    "restore": "patch",
}

__all__ = sorted(_LAZY)


_SUBMODULES = ("kvcompress",)  # `pyramidkv.kvcompress` works without importing it first


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:  # a submodule (pyramidkv.methods, ...), as the eager imports used to provide
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'pyramidkv' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
