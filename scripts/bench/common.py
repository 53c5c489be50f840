"""Measurement helpers shared by the pyramidkv benchmark and the kvpress side of the comparison.

This module must not import pyramidkv: `scripts/bench/kvpress_side.py` runs it in kvpress's own
virtualenv (transformers < 5.3). Everything here is plain torch + transformers.

How things are measured (the benchmark prints the same in its header):
- time: `time.perf_counter` around each forward; on CUDA a `torch.cuda.synchronize()` closes each
  timed region. TTFT = the prefill forward (compression included) + argmax of the first token;
  TPOT = median over the decode steps of one run (each step = one forward on the cache + argmax).
- peak memory, CPU: the process's resident-set high-water mark (VmHWM). Before each run the garbage
  collector and `malloc_trim(0)` return freed memory to the OS, then the mark is reset by writing 5 to
  /proc/self/clear_refs (Linux >= 4.0), so each run's peak is its own. Where that file cannot be
  written, a 1 ms psutil sampling thread is used instead (reported as `rss_sampled`).
- peak memory, CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import threading
import time

import torch

from cli import PRESETS  # noqa: E402  (one list for the flags and the shapes below)


def model_config(preset: str):
    """The benchmark's built-in model shapes (random weights)."""
    from transformers import LlamaConfig

    if preset == "tiny":
        return LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=262144,
            bos_token_id=None, eos_token_id=None, pad_token_id=0,
        )
    if preset == "llama3-8b":
        return LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=262144,
            rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        )
    raise ValueError(f"unknown preset {preset!r}; valid choices: {', '.join(PRESETS)}")


def build_model(model_path: str | None, preset: str, dtype: torch.dtype, device: str, attn: str, seed: int = 0,
                gguf_file: str | None = None):
    """A causal LM in eval mode: from `model_path` (a checkpoint dir or hub id; with `gguf_file`, the
    folder holding that GGUF file) if given, else random weights of `preset`. No tokenizer: the
    benchmark's prompts are random token ids."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if model_path:
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn, **extra)
        return model.to(device).eval()
    config = model_config(preset)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_prompt(length: int, vocab_size: int, device: str, seed: int = 1) -> torch.Tensor:
    """Random token ids [1, length] (seeded; identical across environments with the same torch)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=generator).to(device)


def kv_shape(model) -> dict:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads,
        "head_dim": head_dim,
        "dtype_bytes": torch.empty(0, dtype=model.dtype).element_size(),
    }


def cache_nbytes(cache) -> int:
    """Bytes of K/V held by a cache (its own `nbytes()` if it has one, else the layers' tensors)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def cache_physical_lengths(cache) -> list[int]:
    lengths = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        lengths.append(int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0)
    return lengths


def summarize(values) -> dict:
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ---- memory -------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """`with PeakMemory(device) as peak:` ... then `peak.bytes` (high-water mark) and `peak.base_bytes`."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.startswith("cuda") else None
        self.bytes = self.base_bytes = None
        self._thread = None

    def __enter__(self):
        release_memory(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_bytes = torch.cuda.memory_allocated()
        elif _can_reset_hwm():
            self.kind = "rss_hwm"
            self.base_bytes = _status_kb("VmRSS") * 1024
        else:
            import psutil

            self.kind = "rss_sampled"
            process = psutil.Process()
            self.base_bytes = self._sampled = process.memory_info().rss
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._sampled = max(self._sampled, process.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        elif self.kind == "rss_hwm":
            self.bytes = _status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = self._sampled
        return False


# ---- timing -------------------------------------------------------------------------------------
def synchronizer(device: str):
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def timed(function, sink: list, sync):
    """`function` wrapped so that each call's duration (seconds) is appended to `sink`."""

    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        sync()
        sink.append(time.perf_counter() - start)
        return result

    return wrapper


@torch.no_grad()
def timed_generation(model, input_ids, new_tokens: int, cache, prefill_scope, decode_scope,
                     explicit_positions: bool, sync) -> dict:
    """One greedy run: a timed prefill (returns the first token), then new_tokens - 1 timed decode steps.

    `prefill_scope` / `decode_scope`: context-manager factories around the forwards (the compression
    hooks). `explicit_positions`: pass position_ids (kvpress's own decode loop does; pyramidkv reads
    positions from the cache's true length).
    """
    prompt_len = input_ids.shape[1]
    sync()
    start = time.perf_counter()
    with prefill_scope():
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
    sync()
    ttft = time.perf_counter() - start
    cache = out.past_key_values
    del out
    kv_prefill = cache_nbytes(cache)
    lengths_prefill = cache_physical_lengths(cache)
    steps = []
    with decode_scope():
        for step in range(new_tokens - 1):
            kwargs = {}
            if explicit_positions:
                kwargs["position_ids"] = torch.full((1, 1), prompt_len + step, device=input_ids.device)
            sync()
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            steps.append(time.perf_counter() - start)
    return {
        "ttft_s": ttft,
        "step_s": steps,
        "kv_bytes_prefill": kv_prefill,
        "kv_bytes_end": cache_nbytes(cache),
        "physical_lengths_prefill": lengths_prefill,
        "last_token": int(token.item()),
        "cache": cache,
    }


def measured_run(one_run, device: str) -> dict:
    """One measured run inside its own PeakMemory."""
    with PeakMemory(device) as peak:
        result = one_run()
    result.pop("cache", None)
    result.update(peak_bytes=peak.bytes, base_bytes=peak.base_bytes, memory_kind=peak.kind)
    return result


def run_repeats(one_run, warmup: int, repeats: int, device: str, progress=None) -> list[dict]:
    """`warmup` discarded runs, then `repeats` measured runs, each inside its own PeakMemory."""
    for _ in range(warmup):
        one_run().pop("cache", None)
        if progress:
            progress()
    runs = []
    for _ in range(repeats):
        runs.append(measured_run(one_run, device))
        if progress:
            progress()
    return runs


def fix_malloc_threshold(threshold: int = 128 * 1024) -> bool:
    """Serve every allocation above `threshold` with its own mmap (glibc mallopt M_MMAP_THRESHOLD).

    glibc starts at 128 KiB but raises the threshold each time a large mmapped block is freed (up to
    32 MiB); blocks below it then come from the heap and stay in the RSS after `free`, so the RSS peak
    of a run depends on which tensors were freed before (measured here: FullKV 650 MB below SnapKV 728
    MB at 16k in one process, although SnapKV holds less). A fixed threshold makes the RSS follow the
    live tensors. Returns False where mallopt is unavailable (non-glibc)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def aggregate(runs: list[dict], new_tokens: int) -> dict:
    """Per-run metrics -> median/min/max over repeats."""
    ttft = [r["ttft_s"] for r in runs]
    tpot = [statistics.median(r["step_s"]) if r["step_s"] else float("nan") for r in runs]
    total = [r["ttft_s"] + sum(r["step_s"]) for r in runs]
    select = [sum(r.get("select_s", [])) for r in runs]
    return {
        "ttft_ms": summarize(1e3 * t for t in ttft),
        "tpot_ms": summarize(1e3 * t for t in tpot),
        "throughput_tok_s": summarize(new_tokens / t for t in total),
        "select_ms": summarize(1e3 * s for s in select),
        "select_share_of_prefill": summarize(s / t for s, t in zip(select, ttft)),
        "peak_mem_mb": summarize(r["peak_bytes"] / 2**20 for r in runs),
        "peak_mem_above_base_mb": summarize((r["peak_bytes"] - r["base_bytes"]) / 2**20 for r in runs),
        "kv_bytes_prefill": runs[-1]["kv_bytes_prefill"],
        "kv_bytes_end": runs[-1]["kv_bytes_end"],
        "physical_lengths_prefill": runs[-1]["physical_lengths_prefill"],
        "memory_kind": runs[-1]["memory_kind"],
        "raw": [
            {"ttft_s": r["ttft_s"], "tpot_s": t, "select_s": s, "peak_bytes": r["peak_bytes"],
             "base_bytes": r["base_bytes"], "last_token": r["last_token"]}
            for r, t, s in zip(runs, tpot, select)
        ],
    }


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    with contextlib.suppress(OSError):
        info["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    return info
