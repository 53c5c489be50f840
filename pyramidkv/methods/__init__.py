"""Method registry: names (case-insensitive, KVCache-Factory spellings) -> method classes."""

from __future__ import annotations

import dataclasses

from .base import KVMethod, PrefillInputs
from .fullkv import FullKV
from .h2o import H2O
from .l2norm import L2Norm
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

METHODS: dict[str, type[KVMethod]] = {
    cls.name: cls for cls in (FullKV, SnapKV, PyramidKV, H2O, StreamingLLM, L2Norm)
}
_BY_LOWER = {name.lower(): cls for name, cls in METHODS.items()}
_BY_LOWER.update({"knorm": L2Norm, "knormpress": L2Norm, "streaming": StreamingLLM, "h2o": H2O})


def list_methods() -> list[str]:
    """Canonical method names."""
    return list(METHODS)


def build_method(method: str | KVMethod, **config) -> KVMethod:
    """A configured method from its name (any case) or an already built method (returned as is)."""
    if isinstance(method, KVMethod):
        if config:
            return dataclasses.replace(method, **config)
        return method
    cls = _BY_LOWER.get(str(method).lower())
    if cls is None:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"unknown config {unknown} for method {cls.name}; valid keys: {', '.join(valid)}")
    return cls(**config)


__all__ = ["KVMethod", "PrefillInputs", "METHODS", "list_methods", "build_method"] + list(METHODS)
