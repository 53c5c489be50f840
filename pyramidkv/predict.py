"""Shared predict loop for the benchmark runners (run_longbench.py, run_ruler.py, ...).

load model -> (runner builds prompts and truncates) -> generate under one compression method ->
append one JSON line per sample. Everything protocol-specific (prompts, truncation, metrics) lives in
the runner; this module only knows how to load and generate greedily (result files: result_files.py;
who may write a results directory, run_meta.json and the settings key: results_dir.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys

from . import method_flags, models
from .sweep_args import expand_sweep  # noqa: F401  (the runners call predict.expand_sweep)

REPO_ROOT = models.REPO_ROOT
DEFAULT_MODEL = models.DEFAULT_MODEL  # short name of the real default model (SmolLM2-135M-Instruct)
DEFAULT_MODEL_PATH = models.TINY_CHECKPOINT  # the embedded checkpoint (short name `tiny`)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
POOLINGS = ("maxpool", "avgpool")
CHAT_TEMPLATE_MODES = ("auto", "none")
GQA_SELECTIONS = ("kv_head", "query_head")  # pyramidkv.methods.base validates (importing it needs torch)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

logger = logging.getLogger("pyramidkv.predict")
_kept_counts_logged: set = set()  # (method, model id) pairs already logged this process


CLIError = method_flags.CLIError  # a user-facing problem reported as one line


# method flags -> pyramidkv config, and the budget in results directory names (see method_flags)
DefaultBudget = method_flags.DefaultBudget
method_config = method_flags.method_config
budget_name = method_flags.budget_name
check_method = method_flags.check_method


def add_common_args(parser: argparse.ArgumentParser, save_dir: str = "results", sweep: bool = False) -> None:
    """Flags shared by every runner (names follow PyramidKV/KVCache-Factory scripts); save_dir is the
    runner's default --save_dir (one per benchmark, so eval.py never sees a mixed tree by default).
    sweep: --method and --max_capacity_prompts take comma lists (the runner expands them, see
    expand_sweep).

    Nothing here imports torch, so `--help` stays fast."""
    g = parser.add_argument_group("model and compression")
    lists = ("; a comma list runs every method x budget from one shared prefill per prompt, with the "
             "same predictions as one run each" if sweep else "")
    g.add_argument("--method", default="FullKV",
                   help="compression method (any case; aliases knorm/knormpress = L2Norm, streaming = "
                        "StreamingLLM): FullKV, SnapKV, PyramidKV, H2O, StreamingLLM, L2Norm, ChunkKV, SimCalKV, "
                        "KeepKV, PyramidInfer, CaM, CS3602's l2_compress ... recent_only; an "
                        f"unknown name lists the registered ones{lists} (default: FullKV)")
    g.add_argument("--model_path", default=DEFAULT_MODEL,
                   help="short name (smollm2 = SmolLM2-135M-Instruct from the registry package; tiny = the "
                        "embedded ckpt/pyramidkv-tiny-llama), a checkpoint dir, a .gguf file or an org/name "
                        f"hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--save_dir", default=save_dir,
                   help=f"root directory for predictions; results go to {{save_dir}}/{{model}}_{{budget}}, budget "
                        f"= tokens (128), compress0.4 / keep0.6 (ratios) or own (CS3602's methods) "
                        f"(default: {save_dir})")
    g.add_argument("--max_capacity_prompts", type=str if sweep else int, default=DefaultBudget(128),
                   help=f"KV entries kept per layer and KV head, window included{lists and ' (comma list)'}; "
                        "or give --compress_ratio (fraction of each prompt removed) or --keep_ratio (fraction "
                        "kept) instead (default: 128)")
    g.add_argument("--attn_implementation", default="sdpa", choices=ATTN_IMPLEMENTATIONS,
                   help="attention kernel (default: sdpa)")
    g.add_argument("--window_size", type=int, default=8, help="observation window (default: 8)")
    g.add_argument("--kernel_size", type=int, default=7, help="pooling kernel (default: 7)")
    g.add_argument("--pooling", default="maxpool", choices=POOLINGS, help="vote pooling (default: maxpool)")
    g.add_argument("--gqa_selection", default=None, choices=GQA_SELECTIONS,
                   help="kv_head: one selection per KV head (scores averaged over its query heads); "
                        "query_head: per query head, as KVCache-Factory (default: the method's, kv_head)")
    method_flags.add_method_flags(parser.add_argument_group(
        "method parameters (from the method dataclasses; a method refuses the ones it does not have)"),
        lists=("compress_ratio", "keep_ratio") if sweep else ())
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="auto = bfloat16 on cuda, else float32 (default: auto)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available (default: auto)")
    from .placement import add_placement_args  # here, not at the top: placement imports CLIError from us
    add_placement_args(g)
    g.add_argument("--seed", type=int, default=42, help="random seed (RULER: also of the samples) (default: 42)")
    g.add_argument("--eval_batch_size", type=int, default=1, help="prompts per generate call (left padded) (default: 1)")
    g.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models on CPU)")
    g.add_argument("--print_results_dir", action="store_true",
                   help="print the results directory of each method and budget, then exit (eval.sh scores "
                        "the directory the runner names, whatever EXTRA_ARGS add to the name) (default: off)")
    g.add_argument("--chat_template", default="auto", choices=CHAT_TEMPLATE_MODES,
                   help="auto: wrap prompts with the tokenizer's chat template when it has one (default: auto)")


def validate_method_args(args) -> None:
    """Check --method and its settings before any model is loaded (one-line errors); canonicalizes
    args.method."""
    import pyramidkv
    args.method = check_method(args.method)
    try:
        pyramidkv.build_method(args.method, **method_config(args))
    except ValueError as err:
        raise CLIError(str(err)) from err


def validate_run_args(args) -> None:
    """Everything about the common flags that can be checked without loading a model: the method and
    its config (canonicalizing args.method), batch size, threads, device and attention kernel."""
    for name, value in (("--eval_batch_size", args.eval_batch_size), ("--num_threads", args.num_threads)):
        if value is not None and value < 1:
            raise CLIError(f"{name} {value} must be at least 1")
    validate_method_args(args)
    if args.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise CLIError("--attn_implementation flash_attention_2 needs the flash-attn package "
                       "(pip install -e .[flash]); choose eager or sdpa instead")
    resolve_device(args.device)
    from .placement import validate_placement
    from .sharding import current_shard
    validate_placement(args, current_shard())


def resolve_model(args) -> "models.ResolvedModel":
    """The model --model_path names (one-line CLIError when it names nothing usable); no loading."""
    try:
        resolved = models.resolve_model(args.model_path)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if resolved.kind == "dir":
        check_checkpoint_dir(args.model_path, resolved.path)
    return resolved


def check_checkpoint_dir(spec: str, path: str) -> None:
    """A directory with a config.json is a model only if that config names a model type and weight and
    tokenizer files sit beside it (from_pretrained would fail later with a traceback)."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"directory {spec!r} is not a model: {config_path} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CLIError(f"directory {spec!r} is not a model: {config_path} names no model_type")
    files = os.listdir(path)
    if not any(f.endswith(models.WEIGHT_SUFFIXES) or f.endswith(".index.json") for f in files):
        raise CLIError(f"directory {spec!r} is not a model: no weight files (*.safetensors, *.bin) beside "
                       "its config.json")
    if not any(f in TOKENIZER_FILES for f in files):
        raise CLIError(f"directory {spec!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the "
                       "tokenizer with the model")


def model_name(args) -> str:
    """The model's name in result directory names (SmolLM2-135M-Instruct, a checkpoint dir's basename)."""
    return resolve_model(args).name


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but torch sees no CUDA device; use --device cpu or auto")
    return name


def resolve_dtype(name: str, device: str):
    import torch
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(args, shard=None):
    """Load the causal LM and its tokenizer, ready for left-padded greedy batches: on --device (a
    sharded run's process on its own GPU), or placed by --device_map (pyramidkv.placement)."""
    from . import placement, sharding
    shard = sharding.current_shard() if shard is None else shard
    placement.validate_placement(args, shard)
    resolved = resolve_model(args)
    if args.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise CLIError("--attn_implementation flash_attention_2 needs the flash-attn package "
                       "(pip install -e .[flash]); choose eager or sdpa instead")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    device = placement.process_device(device, shard)
    threads = getattr(args, "num_threads", None)
    if threads is not None:
        if threads < 1:
            raise CLIError(f"--num_threads {threads} must be at least 1")
        import torch
        torch.set_num_threads(threads)
    try:
        model, tokenizer = models.load_pretrained(
            resolved, dtype, args.attn_implementation, log=lambda m: print(m, file=sys.stderr, flush=True),
            **placement.load_kwargs(args))
    except (OSError, ValueError, KeyError) as err:  # transformers' messages span lines: keep the first
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CLIError(f"cannot load model {args.model_path!r} ({resolved.describe()}): {first_line}") from err
    if not placement.load_kwargs(args):  # a placed model stays where its device map put each layer
        model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise CLIError(f"tokenizer of {args.model_path!r} has no pad, eos or unk token to pad batches with")
    return model, tokenizer


def set_seed(seed: int) -> None:
    import random
    import torch
    random.seed(seed)
    torch.manual_seed(seed)


def apply_chat_template(tokenizer, prompt: str, mode: str = "auto") -> str:
    """Wrap one user prompt in the tokenizer's chat template (mode 'auto' and a template exists)."""
    if mode == "none" or not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tokenize=False, add_generation_prompt=True)


def uses_chat_template(tokenizer, mode: str) -> bool:
    return mode != "none" and bool(getattr(tokenizer, "chat_template", None))


def write_run_meta(directory: str, args, extra: dict, settings: dict | None = None) -> None:
    """Record how predictions were made in {directory}/run_meta.json (see results_dir.write_run_meta)."""
    from . import results_dir
    results_dir.write_run_meta(directory, args, extra, settings)


def model_fingerprint(model_path: str) -> str | None:
    """Short sha256 of a local checkpoint or GGUF file (see models.ResolvedModel.fingerprint); None for
    a hub id."""
    return models.resolve_model(model_path).fingerprint()


# ----------------------------------------------------------------------------- generation

_built_methods: dict = {}  # (method, config) -> built method, reused so its state/logs are per run


def _compression_context(model, method: str, config: dict):
    import pyramidkv
    key = (method.lower(), tuple(sorted(config.items())))
    if key not in _built_methods:
        _built_methods[key] = pyramidkv.build_method(method, **config)
    return pyramidkv.compress(model, _built_methods[key])


def _log_kept_counts(model, method: str, cache, prompt_len: int) -> None:
    """Log once per (method, model) the prompt tokens each layer's cache kept after prefill."""
    key = (method.lower(), id(model))
    if key in _kept_counts_logged or cache is None or not hasattr(cache, "kept_tokens"):
        return
    _kept_counts_logged.add(key)
    logger.info("%s: prompt tokens kept per layer (first batch, %d prompt tokens incl. padding): %s",
                method, prompt_len, cache.kept_tokens())


def stop_token_ids(tokenizer, stop_strings: list[str]) -> list[int]:
    """Token id that ends each stop string, as LongBench's pred.py does for samsum's newline
    (``tokenizer.encode("\\n", add_special_tokens=False)[-1]``)."""
    ids = []
    for s in stop_strings:
        encoded = tokenizer.encode(s, add_special_tokens=False)
        if not encoded:
            raise CLIError(f"stop string {s!r} encodes to no tokens with this tokenizer")
        ids.append(encoded[-1])
    return ids


def encode_prompts(model, tokenizer, prompts: list[str]):
    """Left-padded batch encoding; prompts that already start with the BOS token (chat templates insert
    it) are tokenized without adding another one."""
    bos = tokenizer.bos_token
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    from .placement import input_device
    return inputs.to(input_device(model))


def generation_kwargs(model, tokenizer, stop_strings: list[str] | None = None) -> dict:
    """Greedy decoding settings; stop_strings follow the official LongBench recipe: the token id ending
    each string joins the EOS ids, and at least one new token is generated (min_new_tokens=1) so an
    answer cannot stop before it starts. The stop token itself stays in the returned text."""
    kwargs = dict(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                  pad_token_id=tokenizer.pad_token_id)
    if stop_strings:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        kwargs.update(eos_token_id=eos + stop_token_ids(tokenizer, stop_strings), min_new_tokens=1)
    return kwargs


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, method: str, config: dict,
             stop_strings: list[str] | None = None) -> list[str]:
    """Greedy, left-padded batch generation under one compression method; returns new text only
    (see encode_prompts and generation_kwargs)."""
    import torch

    inputs = encode_prompts(model, tokenizer, prompts)
    prompt_len = inputs["input_ids"].shape[1]
    gen_kwargs = dict(generation_kwargs(model, tokenizer, stop_strings), max_new_tokens=max_new_tokens,
                      return_dict_in_generate=True)
    with torch.inference_mode(), _compression_context(model, method, config):
        out = model.generate(**inputs, **gen_kwargs)
    new_tokens = out.sequences[:, prompt_len:]
    _log_kept_counts(model, method, getattr(out, "past_key_values", None), prompt_len)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def generate_many(model, tokenizer, prompts: list[str], max_new_tokens: int, configs: list[tuple[str, dict]],
                  stop_strings: list[str] | None = None) -> list[list[str]]:
    """generate() for several (method, config) pairs from ONE prefill (pyramidkv.shared_prefill):
    the same texts as one generate() per pair, at the cost of one prefill plus one decode each."""
    from .shared_prefill import generate_many as shared

    inputs = encode_prompts(model, tokenizer, prompts)
    outputs = shared(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens, configs,
                     generation_kwargs(model, tokenizer, stop_strings))
    return [tokenizer.batch_decode(tokens, skip_special_tokens=True) for tokens in outputs]


def run_cli(main, argv=None) -> int:
    """Run a runner's main(argv); user errors become one 'error: ...' line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except (CLIError, OSError) as err:  # OSError: a file or directory the run cannot read or write
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad method settings rejected by pyramidkv.compress
        if "\n" in str(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
