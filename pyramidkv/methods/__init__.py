"""Method registry: names (case-insensitive, KVCache-Factory spellings) -> method classes."""

from __future__ import annotations

import dataclasses

from .base import BUDGET_FIELDS, KVMethod, PrefillInputs
from .cam import CaM
from .chunkkv import ChunkKV
from .fullkv import FullKV
from .h2o import H2O
from .keepkv import KeepKV
from .l2norm import L2Norm
from .pyramidinfer import PyramidInfer
from .pyramidkv import PyramidKV
from .simcalkv import SimCalKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

METHODS: dict[str, type[KVMethod]] = {
    cls.name: cls
    for cls in (FullKV, SnapKV, PyramidKV, H2O, StreamingLLM, L2Norm, ChunkKV, SimCalKV, KeepKV, PyramidInfer, CaM)
}
ALIASES = {"knorm": "L2Norm", "knormpress": "L2Norm", "streaming": "StreamingLLM"}


def register_method(cls: type[KVMethod]) -> type[KVMethod]:
    """Make a method available by name (usable as a class decorator)."""
    METHODS[cls.name] = cls
    return cls


def canonical_name(name: str) -> str:
    """The registered spelling of a method name, any case, aliases included ("knorm" -> "L2Norm").

    The one registry that the library and the runners both use; an unknown name raises a one-line
    ValueError listing the methods and the aliases."""
    by_lower = {known.lower(): known for known in METHODS}
    key = str(name).lower()
    found = by_lower.get(key) or by_lower.get(ALIASES.get(key, "").lower())
    if found is None:
        aliases = ", ".join(f"{alias} ({target})" for alias, target in ALIASES.items())
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(METHODS)}; aliases: {aliases}")
    return found


def list_methods() -> list[str]:
    """Canonical method names."""
    return list(METHODS)


def build_method(method: str | KVMethod, **config) -> KVMethod:
    """A configured method from its name (any case) or an already built method (returned as is)."""
    if isinstance(method, KVMethod):
        if config:
            if any(field in config for field in BUDGET_FIELDS):  # a new budget replaces the old one
                config = {**{field: None for field in BUDGET_FIELDS}, **config}
            return dataclasses.replace(method, **config)
        return method
    cls = METHODS[canonical_name(method)]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"unknown config {unknown} for method {cls.name}; valid keys: {', '.join(valid)}")
    return cls(**config)


__all__ = ["ALIASES", "KVMethod", "PrefillInputs", "METHODS", "build_method", "canonical_name", "list_methods",
           "register_method"] + list(METHODS)
