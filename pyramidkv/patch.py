"""How pyramidkv hooks into transformers 5.x without copying any forward function.

Two thin wrappers:
1. around the base model's `forward` (LlamaModel, MistralModel, ...): give the forward a
   `CompressedCache` (replacing an empty `DynamicCache`, e.g. the one `generate` creates) and publish
   it, with the 2-D padding mask, in a context variable for the duration of the forward;
2. around the attention functions (eager/sdpa/flash_attention_2): for a layer that has just received
   its prefill, run attention on the full K/V, then let the cache keep what the method selects from the
   post-RoPE queries and keys. During decoding the wrapper only right-slices the shared mask to the
   layer's own cache length (per-layer budgets), hides a batch row's filler slots and adds the per-slot
   logit bias of merged slots (both additive per-slot terms of one float mask; eager and sdpa).
The attention wrapper is a no-op when no compressed cache is active, so other models are untouched.

Nothing is skipped silently: a cache pyramidkv cannot compress into (StaticCache, a filled
DynamicCache) raises, a CompressedCache given to an unpatched model raises (CompressedCache.update),
and a supported model of a family that `replace_*` did not patch warns once.

`compress(model, ...)` scopes are per context (thread): the model gets one instance forward while any
scope on it is open, and that forward reads the method of the current context's innermost scope, so
two threads compressing one model with two methods each get their own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import threading
import warnings

from transformers.modeling_utils import AttentionInterface

from .attention_masks import _add_slot_bias, _hide_filler_slots
from . import chunked_prefill as _chunked_prefill
from . import pos_shift as _pos_shift
from .cache import ACTIVE_CACHE as _ACTIVE_CACHE
from .cache import CompressedCache
from .patch_checks import check_attention_implementation, check_cache_is_compressible
from .methods import build_method

# model family -> (module path, base model class names)
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", ("LlamaModel",)),
    "mistral": ("transformers.models.mistral.modeling_mistral", ("MistralModel",)),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", ("Qwen2Model",)),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", ("Qwen3Model",)),
}

_lock = threading.RLock()  # guards the module-level patch state below (scopes may open in threads)
_original_attention: dict[tuple[object, str], object] = {}  # (namespace, name) -> original function
_class_patches: dict[type, tuple[object, object]] = {}  # class -> (original forward, method)
_open_scopes = 0  # `compress` blocks currently open (the attention wrappers stay while any is)
# base model -> [open scopes, had an instance forward before, that forward]
_scoped_models: dict[object, list] = {}
# base model -> method of this context's innermost open scope (never mutated: each scope sets a copy)
_SCOPED_METHODS: contextvars.ContextVar[dict] = contextvars.ContextVar("pyramidkv_scoped_methods", default={})
_warned_unpatched: set[type] = set()


# ---- attention ----------------------------------------------------------------------------------
class _StoredHeadsModule:
    """The attention module as the attention function sees it when the cache stores one head per query
    head (gqa_selection="query_head"): num_key_value_groups = 1, so eager/sdpa's repeat_kv (and sdpa's
    single-query GQA packing) leave the keys as they are; everything else is the module's own."""

    num_key_value_groups = 1

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def _compressing_attention(base_attention, kind: str):
    """`kind`: "eager", "sdpa" or "flash" (which mask format the base function takes)."""

    @functools.wraps(base_attention)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        cache = _ACTIVE_CACHE.get()
        if cache is None:
            if _class_patches:
                _warn_if_family_unpatched(module)
            return base_attention(module, query, key, value, attention_mask, *args, **kwargs)
        layer = cache.layers[module.layer_idx]
        if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
            attention_mask = attention_mask[..., -key.shape[-2] :]
        if getattr(layer, "attends_itself", False) and not layer.needs_compression:
            # per-head storage (pyramidkv/perhead.py): every KV head holds its own number of tokens, so the
            # layer runs attention itself; `key`/`value` are this step's new tokens, the mask their columns
            return layer.attend(module, query, attention_mask, kwargs.get("scaling") or module.scaling, kind)
        if layer.filler_slots is not None:  # also a prefill chunk's attention over the kept slots
            attention_mask = _hide_filler_slots(attention_mask, layer.filler_slots, query, key, kind)
        if layer.slot_bias is not None and not layer.needs_compression:
            if kind == "flash":
                raise ValueError(f"{cache.method.name} stores a per-slot logit bias, which flash_attention_2 "
                                 f"cannot add; valid choices: eager, sdpa")
            attention_mask = _add_slot_bias(attention_mask, layer.slot_bias, query, key)
        attending = module
        if key.shape[1] == query.shape[1] and getattr(module, "num_key_value_groups", 1) > 1:
            attending = _StoredHeadsModule(module)
        if cache.method.pos_shift and not layer.needs_compression:  # positions by slot (pos_shift.py)
            query = _pos_shift.shift_new_tokens(cache, layer, query)
        output = base_attention(attending, query, key, value, attention_mask, *args, **kwargs)
        if layer.needs_compression:
            scaling = kwargs.get("scaling") or module.scaling
            cache.compress_layer(module.layer_idx, query, key, value, scaling)
        elif cache.method.decodes:  # compression while decoding: after the new token's attention
            cache.decode_layer(module.layer_idx, query, kwargs.get("scaling") or module.scaling)
        return output

    attention.__pyramidkv_wrapped__ = True
    return attention


def _family_of(module) -> str | None:
    path = type(module).__module__
    return next((family for family, (module_path, _) in FAMILIES.items() if module_path == path), None)


def _warn_if_family_unpatched(module) -> None:
    """Warn once per attention class that a supported model runs uncompressed because `replace_*`
    patched other families only (a compress scope or a patched family would have an active cache)."""
    cls = type(module)
    if cls in _warned_unpatched:
        return
    family = _family_of(module)
    if family is None:
        return
    _, classes = _family_classes(family)
    if all(base in _class_patches for base in classes):
        return  # its family is patched: this forward runs without a cache (use_cache=False)
    _warned_unpatched.add(cls)
    patched = ", ".join(sorted(base.__name__ for base in _class_patches))
    warnings.warn(
        f"pyramidkv: {cls.__name__} runs uncompressed: the active patch covers {patched} only; "
        f"call pyramidkv.replace(method, ...) (every family) or replace_{family}(...)",
        stacklevel=3,
    )


def _wrap_attention_functions() -> None:
    """Wrap the global sdpa/flash entries and every supported family's eager function (idempotent;
    all families, so that a model of an unpatched family can be warned about)."""
    with _lock:
        for name in ("sdpa", "flash_attention_2", "flash_attention_3"):
            key = (AttentionInterface, name)
            if key not in _original_attention and name in AttentionInterface._global_mapping:
                original = AttentionInterface._global_mapping[name]
                _original_attention[key] = original
                kind = "sdpa" if name == "sdpa" else "flash"
                AttentionInterface._global_mapping[name] = _compressing_attention(original, kind)
        for family in FAMILIES:
            family_module, _ = _family_classes(family)
            key = (family_module, "eager_attention_forward")
            if key not in _original_attention and hasattr(family_module, "eager_attention_forward"):
                original = family_module.eager_attention_forward
                _original_attention[key] = original
                family_module.eager_attention_forward = _compressing_attention(original, "eager")


def _unwrap_attention_functions() -> None:
    for (namespace, name), original in _original_attention.items():
        if namespace is AttentionInterface:
            AttentionInterface._global_mapping[name] = original
        else:
            setattr(namespace, name, original)
    _original_attention.clear()


# ---- model forward ------------------------------------------------------------------------------
def _forward_with_compression(original_forward, get_method):
    """`original_forward(model, ...)` wrapped so that it runs on (and activates) a CompressedCache."""
    parameters = list(inspect.signature(original_forward).parameters)[1:]  # after `self`

    def argument(args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        position = parameters.index(name) if name in parameters else len(args)
        return args[position] if position < len(args) else None

    @functools.wraps(original_forward)
    def forward(model, *args, **kwargs):
        cache = argument(args, kwargs, "past_key_values")
        use_cache = argument(args, kwargs, "use_cache")
        if use_cache is None:
            use_cache = model.config.use_cache
        if use_cache and not isinstance(cache, CompressedCache):
            check_cache_is_compressible(cache, model)
        if isinstance(cache, CompressedCache) or use_cache:
            if not isinstance(cache, CompressedCache):
                cache = CompressedCache(get_method(model), model.config)
            check_attention_implementation(model.config, cache.method)
            cache.method.prepare_model(model)
            if cache is not argument(args, kwargs, "past_key_values"):
                position = parameters.index("past_key_values")
                if position < len(args):
                    args = (*args[:position], cache, *args[position + 1 :])
                else:
                    kwargs["past_key_values"] = cache
            mask = argument(args, kwargs, "attention_mask")
            cache.padding_mask = mask if mask is not None and mask.dim() == 2 else None
            if cache.method.pos_shift:
                args, kwargs = _slot_positions(model, cache, parameters, argument, args, kwargs)
            token = _ACTIVE_CACHE.set(cache)
            try:
                tokens = argument(args, kwargs, "input_ids")
                tokens = tokens if tokens is not None else argument(args, kwargs, "inputs_embeds")
                if tokens is not None and _chunked_prefill.should_chunk(cache, tokens.shape[1]):
                    return _chunked_prefill.run_chunked(original_forward, model, cache, parameters, args, kwargs)
                return original_forward(model, *args, **kwargs)
            finally:
                _ACTIVE_CACHE.reset(token)
        return original_forward(model, *args, **kwargs)

    forward.__pyramidkv_original__ = original_forward
    return forward


def _slot_positions(model, cache, parameters, argument, args, kwargs):
    """pos_shift: the forward's position_ids replaced by the cache's slot ranks (pos_shift.py)."""
    tokens = argument(args, kwargs, "input_ids")
    tokens = tokens if tokens is not None else argument(args, kwargs, "inputs_embeds")
    positions = _pos_shift.set_positions(model, cache, tokens.shape[1], argument(args, kwargs, "position_ids"),
                                         tokens.device)
    index = parameters.index("position_ids") if "position_ids" in parameters else len(args)
    if index < len(args):
        return (*args[:index], positions, *args[index + 1:]), kwargs
    return args, {**kwargs, "position_ids": positions}


def _family_classes(family: str) -> tuple[object, list[type]]:
    module_path, class_names = FAMILIES[family]
    module = importlib.import_module(module_path)
    return module, [getattr(module, name) for name in class_names]


def _patch_family(family: str, built, rebind: bool = True) -> None:
    _, classes = _family_classes(family)
    _wrap_attention_functions()
    with _lock:
        for cls in classes:
            original = _class_patches[cls][0] if cls in _class_patches else cls.forward
            _class_patches[cls] = (original, built)
            cls.forward = _forward_with_compression(original, lambda model, cls=cls: _class_patches[cls][1])
        if rebind:
            _rebind_hooked_instances(classes)


def _rebind_hooked_instances(classes) -> None:
    """accelerate's hooks (device_map) replace an instance's forward by one that calls the bound forward
    the instance had when it was hooked (`module._old_forward`), so a model loaded with a device_map that
    hooks its base model BEFORE `replace_*` / `restore()` would keep running the old class forward and
    compress nothing (or keep compressing): point those at the class's current forward."""
    import gc

    classes = tuple(classes)
    for instance in gc.get_objects():  # ~0.1 s; only at replace_* / restore
        if type(instance) in classes and "_old_forward" in vars(instance) and hasattr(instance, "_hf_hook"):
            instance._old_forward = type(instance).forward.__get__(instance)


def _replace(family: str, method, **config) -> None:
    _patch_family(family, build_method(method, **config))


def replace(method: str, **config) -> None:
    """`replace_llama` for every supported family at once (Llama, Mistral, Qwen2, Qwen3), so whichever
    model is loaded is compressed. Undo with `pyramidkv.restore()`."""
    built = build_method(method, **config)
    for family in FAMILIES:
        _patch_family(family, built, rebind=False)
    with _lock:
        _rebind_hooked_instances(_class_patches)  # one scan of the heap for all families


def replace_llama(method: str, **config) -> None:
    """Make every Llama model (loaded before or after this call) compress its KV cache at prefill.

    `method`: one of `pyramidkv.list_methods()` (any case); `config`: max_capacity_prompt, window_size,
    kernel_size, pooling and the method's own settings. Undo with `pyramidkv.restore()`.
    """
    _replace("llama", method, **config)


def replace_mistral(method: str, **config) -> None:
    """`replace_llama` for Mistral models."""
    _replace("mistral", method, **config)


def replace_qwen2(method: str, **config) -> None:
    """`replace_llama` for Qwen2 models."""
    _replace("qwen2", method, **config)


def replace_qwen3(method: str, **config) -> None:
    """`replace_llama` for Qwen3 models."""
    _replace("qwen3", method, **config)


def restore() -> None:
    """Undo every `replace_*` patch and (unless a compress scope is open) the attention wrappers."""
    with _lock:
        for cls, (original, _) in _class_patches.items():
            cls.forward = original
        if _class_patches:
            _rebind_hooked_instances(_class_patches)
        _class_patches.clear()
        _warned_unpatched.clear()  # a later patch warns again
        if not _open_scopes:
            _unwrap_attention_functions()


def _base_model(model):
    """The decoder (LlamaModel, ...) inside a *ForCausalLM, and its family name."""
    for family in FAMILIES:
        _, classes = _family_classes(family)
        for candidate in (model, getattr(model, "model", None)):
            if candidate is not None and isinstance(candidate, tuple(classes)):
                return candidate, family
    supported = ", ".join(f"{name}ForCausalLM" for name in ("Llama", "Mistral", "Qwen2", "Qwen3"))
    raise ValueError(f"unsupported model {type(model).__name__}; supported: {supported}")


def _scoped_forward(base):
    """The instance forward a model has while compress scopes on it are open: the current context's
    scope method, or (no scope in this context, e.g. another thread) the model's own forward."""
    original = type(base).forward
    compressing = _forward_with_compression(
        getattr(original, "__pyramidkv_original__", original), lambda model: _SCOPED_METHODS.get()[model]
    )

    def forward(model, *args, **kwargs):
        if model in _SCOPED_METHODS.get():
            return compressing(model, *args, **kwargs)
        _, had_instance_forward, previous = _scoped_models.get(model, (0, False, None))
        if had_instance_forward:
            return previous(*args, **kwargs)
        return type(model).forward(model, *args, **kwargs)  # replace_*'s patch, if any

    return forward


@contextlib.contextmanager
def compress(model, method: str, **config):
    """Scoped form: only `model`, only inside the `with` block, only in this context (thread).

        with pyramidkv.compress(model, "snapkv", max_capacity_prompt=128):
            model.generate(...)

    Scopes nest, and scopes on one model in several threads each use their own method; the model's
    forward is back to its own once the last scope on it closes.
    """
    global _open_scopes
    built = build_method(method, **config)
    base, _ = _base_model(model)
    check_attention_implementation(base.config, built)
    _wrap_attention_functions()
    with _lock:
        _open_scopes += 1
        entry = _scoped_models.get(base)
        if entry is None:
            had_instance_forward = "forward" in vars(base)
            entry = _scoped_models[base] = [0, had_instance_forward, vars(base).get("forward")]
            base.forward = _scoped_forward(base).__get__(base)
        entry[0] += 1
    token = _SCOPED_METHODS.set({**_SCOPED_METHODS.get(), base: built})
    try:
        yield built
    finally:
        _SCOPED_METHODS.reset(token)
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _scoped_models[base]
                if entry[1]:
                    base.forward = entry[2]
                else:
                    del base.forward
            _open_scopes -= 1
            if not _class_patches and not _open_scopes:
                _unwrap_attention_functions()
