"""Method registry: names (case-insensitive, KVCache-Factory spellings) -> method classes.

Parameter aliases: a name that is an existing method under other parameter names (CS3602's
streaming_llm and recent_only are StreamingLLM) maps its parameters onto that method; no copy."""

from __future__ import annotations

import dataclasses

from .base import BUDGET_FIELDS, KVMethod, PrefillInputs
from .adakv import AdaKV, AdaPyramidKV
from .headkv import HeadKV
from .cam import CaM
from .chunkkv import ChunkKV
from .commonkv import CommonKV
from .cs3602 import CS3602_METHODS
from .fullkv import FullKV
from .h2o import H2O
from .keepkv import KeepKV
from .l2norm import L2Norm
from .pyramidinfer import PyramidInfer
from .pyramidkv import PyramidKV
from .simcalkv import SimCalKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .tova import TOVA

METHODS: dict[str, type[KVMethod]] = {
    cls.name: cls
    for cls in (FullKV, SnapKV, PyramidKV, H2O, StreamingLLM, L2Norm, ChunkKV, SimCalKV, KeepKV, PyramidInfer, CaM,
                TOVA, *CS3602_METHODS, AdaKV, AdaPyramidKV, HeadKV, CommonKV)
}
ALIASES = {"knorm": "L2Norm", "knormpress": "L2Norm", "streaming": "StreamingLLM"}


def _streaming_llm(start_size: int = 4, recent_size: int = 508, skip_layers=None, **common) -> dict:
    """CS3602 streaming_llm: start_size sinks + recent_size recent tokens = StreamingLLM with
    sink_size=start_size and a budget of start_size + recent_size (recency fills all but the sinks, so
    any window below the budget keeps the same tokens)."""
    for name, value, minimum in (("start_size", start_size, 0), ("recent_size", recent_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {minimum}")
    capacity = start_size + recent_size
    return {"sink_size": start_size, "max_capacity_prompt": capacity, "skip_layers": skip_layers,
            # the window stays inside the recent part, so all start_size sinks fit in the budget
            "window_size": max(1, min(8, recent_size, capacity - 1)) if isinstance(capacity, int) else 8, **common}


def _recent_only(window_size: int = 512, skip_layers=(0, 1), **common) -> dict:
    """CS3602 recent_only: the last window_size tokens = StreamingLLM without sinks."""
    return _streaming_llm(start_size=0, recent_size=window_size, skip_layers=skip_layers, **common)


# name -> (method, parameter mapping, the alias's own parameters)
PARAMETER_ALIASES = {
    "streaming_llm": ("StreamingLLM", _streaming_llm, ("start_size", "recent_size", "skip_layers")),
    "recent_only": ("StreamingLLM", _recent_only, ("window_size", "skip_layers")),
}


def register_method(cls: type[KVMethod]) -> type[KVMethod]:
    """Make a method available by name (usable as a class decorator)."""
    METHODS[cls.name] = cls
    return cls


def canonical_name(name: str) -> str:
    """The registered spelling of a method name, any case, aliases included ("knorm" -> "L2Norm").

    The one registry that the library and the runners both use; an unknown name raises a one-line
    ValueError listing the methods and the aliases."""
    by_lower = {known.lower(): known for known in [*METHODS, *PARAMETER_ALIASES]}
    key = str(name).lower()
    found = by_lower.get(key) or by_lower.get(ALIASES.get(key, "").lower())
    if found is None:
        aliases = ", ".join(f"{alias} ({target})" for alias, target in ALIASES.items())
        aliases += "".join(f", {alias} ({target}, CS3602 parameters)" for alias, (target, _, _) in PARAMETER_ALIASES.items())
        raise ValueError(f"unknown method {name!r}; valid choices: {', '.join(METHODS)}; aliases: {aliases}")
    return found


def decode_methods() -> list[str]:
    """Methods that can compress while decoding (max_cache_size / compress_interval)."""
    return [name for name, cls in METHODS.items() if cls.has_decode_form]


def list_methods() -> list[str]:
    """Canonical method names."""
    return list(METHODS)


def config_keys(method: str) -> list[str]:
    """The settings `build_method(method, ...)` accepts (any case, aliases included)."""
    name = canonical_name(method)
    if name in PARAMETER_ALIASES:
        target, _, own = PARAMETER_ALIASES[name]
        return [*own, *(f.name for f in dataclasses.fields(METHODS[target])
                        if f.name not in (*BUDGET_FIELDS, "window_size", "sink_size", "skip_layers"))]
    return [f.name for f in dataclasses.fields(METHODS[name])]


def build_method(method: str | KVMethod, **config) -> KVMethod:
    """A configured method from its name (any case) or an already built method (returned as is)."""
    if isinstance(method, KVMethod):
        if config:
            if any(field in config for field in BUDGET_FIELDS):  # a new budget replaces the old one
                config = {**{field: None for field in BUDGET_FIELDS}, **config}
            return dataclasses.replace(method, **config)
        return method
    name = canonical_name(method)
    valid = config_keys(name)
    unknown = sorted(set(config) - set(valid))
    if name in PARAMETER_ALIASES:
        target, mapping, _ = PARAMETER_ALIASES[name]
        if unknown:
            raise ValueError(f"unknown config {unknown} for method {name}; valid keys: {', '.join(valid)}")
        return METHODS[target](**mapping(**config))
    cls = METHODS[name]
    if unknown:
        raise ValueError(f"unknown config {unknown} for method {cls.name}; valid keys: {', '.join(valid)}")
    return cls(**config)


__all__ = ["ALIASES", "KVMethod", "PrefillInputs", "METHODS", "build_method", "canonical_name", "config_keys", "decode_methods",
           "list_methods",
           "register_method"] + list(METHODS)
