"""How pyramidkv hooks into transformers 5.x without copying any forward function.

Two thin wrappers:
1. around the base model's `forward` (LlamaModel, MistralModel, ...): give the forward a
   `CompressedCache` (replacing an empty `DynamicCache`, e.g. the one `generate` creates) and publish
   it, with the 2-D padding mask, in a context variable for the duration of the forward;
2. around the attention functions (eager/sdpa/flash_attention_2): for a layer that has just received
   its prefill, run attention on the full K/V, then let the cache keep what the method selects from the
   post-RoPE queries and keys. During decoding the wrapper only right-slices the shared mask to the
   layer's own cache length (per-layer budgets).
The attention wrapper is a no-op when no compressed cache is active, so other models are untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect

from transformers.cache_utils import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .cache import CompressedCache
from .methods import build_method

_ACTIVE_CACHE: contextvars.ContextVar[CompressedCache | None] = contextvars.ContextVar(
    "pyramidkv_active_cache", default=None
)

# model family -> (module path, base model class names)
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", ("LlamaModel",)),
    "mistral": ("transformers.models.mistral.modeling_mistral", ("MistralModel",)),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", ("Qwen2Model",)),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", ("Qwen3Model",)),
}
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

_original_attention: dict[tuple[object, str], object] = {}  # (namespace, name) -> original function
_class_patches: dict[type, tuple[object, object]] = {}  # class -> (original forward, method)
_open_scopes = 0  # `compress` blocks currently open (the attention wrappers stay while any is)


# ---- attention ----------------------------------------------------------------------------------
def _compressing_attention(base_attention):
    @functools.wraps(base_attention)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        cache = _ACTIVE_CACHE.get()
        if cache is None:
            return base_attention(module, query, key, value, attention_mask, *args, **kwargs)
        layer = cache.layers[module.layer_idx]
        if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
            attention_mask = attention_mask[..., -key.shape[-2] :]
        output = base_attention(module, query, key, value, attention_mask, *args, **kwargs)
        if layer.needs_compression:
            scaling = kwargs.get("scaling") or module.scaling
            cache.compress_layer(module.layer_idx, query, key, value, scaling)
        return output

    attention.__pyramidkv_wrapped__ = True
    return attention


def _wrap_attention_functions(family_module) -> None:
    """Wrap the global sdpa/flash entries and this model family's eager function (idempotent)."""
    for name in ("sdpa", "flash_attention_2", "flash_attention_3"):
        key = (AttentionInterface, name)
        if key not in _original_attention and name in AttentionInterface._global_mapping:
            original = AttentionInterface._global_mapping[name]
            _original_attention[key] = original
            AttentionInterface._global_mapping[name] = _compressing_attention(original)
    key = (family_module, "eager_attention_forward")
    if key not in _original_attention and hasattr(family_module, "eager_attention_forward"):
        original = family_module.eager_attention_forward
        _original_attention[key] = original
        family_module.eager_attention_forward = _compressing_attention(original)


def _unwrap_attention_functions() -> None:
    for (namespace, name), original in _original_attention.items():
        if namespace is AttentionInterface:
            AttentionInterface._global_mapping[name] = original
        else:
            setattr(namespace, name, original)
    _original_attention.clear()


# ---- model forward ------------------------------------------------------------------------------
def check_attention_implementation(config) -> None:
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={implementation!r} is not supported by pyramidkv; "
            f"valid choices: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package "
            "(pip install -e .[flash] on a CUDA machine); valid choices without it: eager, sdpa"
        )


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
        if isinstance(cache, CompressedCache) or (
            use_cache and (cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0))
        ):
            check_attention_implementation(model.config)
            if not isinstance(cache, CompressedCache):
                cache = CompressedCache(get_method(model), model.config)
                position = parameters.index("past_key_values")
                if position < len(args):
                    args = (*args[:position], cache, *args[position + 1 :])
                else:
                    kwargs["past_key_values"] = cache
            mask = argument(args, kwargs, "attention_mask")
            cache.padding_mask = mask if mask is not None and mask.dim() == 2 else None
            token = _ACTIVE_CACHE.set(cache)
            try:
                return original_forward(model, *args, **kwargs)
            finally:
                _ACTIVE_CACHE.reset(token)
        return original_forward(model, *args, **kwargs)

    forward.__pyramidkv_original__ = original_forward
    return forward


def _family_classes(family: str) -> tuple[object, list[type]]:
    module_path, class_names = FAMILIES[family]
    module = importlib.import_module(module_path)
    return module, [getattr(module, name) for name in class_names]


def _replace(family: str, method, **config) -> None:
    built = build_method(method, **config)
    module, classes = _family_classes(family)
    _wrap_attention_functions(module)
    for cls in classes:
        if cls in _class_patches:
            original, _ = _class_patches[cls]
        else:
            original = cls.forward
        _class_patches[cls] = (original, built)
        cls.forward = _forward_with_compression(original, lambda model, cls=cls: _class_patches[cls][1])


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
    """Undo every `replace_*` patch and attention wrapper."""
    for cls, (original, _) in _class_patches.items():
        cls.forward = original
    _class_patches.clear()
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


@contextlib.contextmanager
def compress(model, method: str, **config):
    """Scoped form: only `model`, only inside the `with` block.

        with pyramidkv.compress(model, "snapkv", max_capacity_prompt=128):
            model.generate(...)
    """
    global _open_scopes
    built = build_method(method, **config)
    base, family = _base_model(model)
    check_attention_implementation(base.config)
    module, _ = _family_classes(family)
    _wrap_attention_functions(module)
    _open_scopes += 1
    had_instance_forward = "forward" in vars(base)
    previous = base.forward
    original = type(base).forward
    original = getattr(original, "__pyramidkv_original__", original)
    wrapped = _forward_with_compression(original, lambda _model: built)
    base.forward = wrapped.__get__(base)
    try:
        yield built
    finally:
        if had_instance_forward:
            base.forward = previous
        else:
            del base.forward
        _open_scopes -= 1
        if not _class_patches and not _open_scopes:
            _unwrap_attention_functions()
