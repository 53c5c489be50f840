"""One benchmark configuration (method, context length, budget) on pyramidkv: warm-up + timed repeats.

A configuration runs a manual greedy loop: `model(prompt, past_key_values=cache, logits_to_keep=1)`
inside `pyramidkv.compress(...)` (prefill + compression), then `model(token, past_key_values=cache)`
per step (positions come from the cache's true length). The cache is a `CompressedCache` built here so
that its `compress_layer` can be timed in place: the selection cost is the sum over layers of
`compress_layer` (budgets + scoring + top-k + gather + store) during the timed prefill itself.
`DynamicCache` is transformers' own cache without pyramidkv (torch.cat growth), for reference.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import pyramidkv`
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyramidkv  # noqa: E402
from common import aggregate, make_prompt, measured_run, release_memory, run_repeats, synchronizer  # noqa: E402
from common import timed, timed_generation  # noqa: E402
from transformers import DynamicCache  # noqa: E402

BASELINE = "DynamicCache"  # transformers' default cache, no pyramidkv involved
UNCOMPRESSED = ("FullKV", BASELINE)


def canonical_method(name: str) -> str:
    if name.lower() in ("dynamiccache", "dynamic", "hf", "none"):
        return BASELINE
    return pyramidkv.build_method(name).name


def method_settings(method: str, budget: int, args) -> dict:
    settings = {
        "max_capacity_prompt": budget,
        "window_size": args.window_size,
        "kernel_size": args.kernel_size,
        "pooling": args.pooling,
    }
    if method == "L2Norm" and args.l2norm_skip_layers is not None:
        settings["skip_layers"] = args.l2norm_skip_layers
    return settings


def expected_kv_bytes(method: str, settings: dict, context: int, shape: dict) -> tuple[int, int]:
    """(exact bytes the method's budgets imply, budget x layers x KV heads x head_dim x 2 x dtype)."""
    per_token = shape["kv_heads"] * shape["head_dim"] * 2 * shape["dtype_bytes"]
    if method == BASELINE:
        return context * shape["layers"] * per_token, context * shape["layers"] * per_token
    built = pyramidkv.build_method(method, **settings)
    budgets = built.layer_budgets(context, shape["layers"])
    uniform = min(settings["max_capacity_prompt"], context) if method != "FullKV" else context
    return sum(min(b, context) for b in budgets) * per_token, uniform * shape["layers"] * per_token


class ConfigRunner:
    """One configuration: `run()` = one untimed-for-the-record (warm-up) run, `measure()` = one measured
    run with its peak memory, `record(runs)` = the aggregated record."""

    def __init__(self, model, method: str, context: int, budget: int | None, args, shape: dict):
        self.model, self.method, self.context, self.budget, self.args, self.shape = (
            model, method, context, budget, args, shape)
        self.sync = synchronizer(args.device)
        self.input_ids = make_prompt(context, model.config.vocab_size, args.device, seed=args.seed)
        self.settings = method_settings(method, budget or context, args) if method != BASELINE else {}

    def run(self) -> dict:
        model, method, settings, select_s = self.model, self.method, self.settings, []
        if method == BASELINE:
            cache, scope = DynamicCache(), contextlib.nullcontext
        else:
            cache = pyramidkv.CompressedCache(method, model.config, **settings)
            cache.compress_layer = timed(cache.compress_layer, select_s, self.sync)

            def scope():
                return pyramidkv.compress(model, method, **settings)

        result = timed_generation(model, self.input_ids, self.args.new_tokens, cache, scope, scope,
                                  explicit_positions=False, sync=self.sync)
        result["select_s"] = select_s
        return result

    def warm(self) -> None:
        self.run().pop("cache", None)

    def measure(self) -> dict:
        return measured_run(self.run, self.args.device)

    def record(self, runs: list[dict]) -> dict:
        record = {"method": self.method, "context": self.context, "budget": self.budget, "settings": self.settings}
        record.update(aggregate(runs, self.args.new_tokens))
        settings = self.settings or {"max_capacity_prompt": self.context}
        exact, formula = expected_kv_bytes(self.method, settings, self.context, self.shape)
        record["kv_bytes_expected"] = exact
        record["kv_bytes_formula"] = formula
        record["kv_bytes_exact"] = record["kv_bytes_prefill"] == exact
        record["deterministic"] = len({r["last_token"] for r in record["raw"]}) == 1
        return record


def measure_config(model, method: str, context: int, budget: int | None, args, shape: dict, progress=None) -> dict:
    """Warm-up + repeats of one configuration, back to back; returns the aggregated record."""
    runner = ConfigRunner(model, method, context, budget, args, shape)
    release_memory(args.device)
    return runner.record(run_repeats(runner.run, args.warmup, args.repeats, args.device, progress))


def measure_interleaved(model, configs: list[tuple], args, shape: dict, progress=None) -> list[dict]:
    """Warm-up runs of every configuration, then `repeats` rounds that each run every configuration
    once: slow drifts of the machine then spread over all configurations instead of biasing one."""
    runners = [ConfigRunner(model, m, c, b, args, shape) for m, c, b in configs]
    for runner in runners:
        for _ in range(args.warmup):
            runner.warm()
            if progress:
                progress(runner)
    runs: list[list[dict]] = [[] for _ in runners]
    for _ in range(args.repeats):
        for runner, sink in zip(runners, runs):
            sink.append(runner.measure())
            if progress:
                progress(runner)
    return [runner.record(sink) for runner, sink in zip(runners, runs)]


def plan(methods: list[str], contexts: list[int], budgets: list[int], reference: bool) -> list[tuple]:
    """(method, context, budget) to run: uncompressed methods once per context (budget None);
    compressed ones for every budget below the context; plus, with `reference`, the uncompressed
    methods at a prompt as long as each budget (what decoding the kept tokens alone costs)."""
    configs = []
    if reference:
        for budget in sorted(set(budgets)):
            if budget not in contexts:
                configs.extend((m, budget, None) for m in methods if m in UNCOMPRESSED)
    for context in contexts:
        for method in methods:
            if method in UNCOMPRESSED:
                configs.append((method, context, None))
            else:
                configs.extend((method, context, b) for b in budgets if b < context)
    return configs


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
