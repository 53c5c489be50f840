"""A sweep's command line expanded into one namespace per (method, budget): comma lists of --method and
--max_capacity_prompts (or --compress_ratio / --keep_ratio), with each method given only its own
parameter flags. The runners call it as predict.expand_sweep."""
from __future__ import annotations

import argparse

from . import method_flags
from .method_flags import CLIError, DefaultBudget, check_method


def expand_sweep(args) -> list[argparse.Namespace]:
    """One namespace per (method, budget) of comma-list --method and --max_capacity_prompts (or
    --compress_ratio / --keep_ratio), methods canonicalized; FullKV keeps everything and CS3602's methods
    size their own cache, so each runs once (under the first budget) — but a swept ratio that is a
    self-sized method's own parameter runs it once per value, each in its own directory (own_keep0.25)."""
    methods = [m.strip() for m in str(args.method).split(",") if m.strip()]
    ratio_flags = [f for f in ("compress_ratio", "keep_ratio") if getattr(args, f, None) is not None]
    if len(ratio_flags) > 1:
        raise CLIError("--compress_ratio and --keep_ratio both given: give one budget only")
    budgets = []  # (namespace changes, budget key)
    if ratio_flags:
        flag = ratio_flags[0]
        for text in str(getattr(args, flag)).split(","):
            try:
                budgets.append(({flag: float(text)}, float(text)))
            except ValueError:
                raise CLIError(f"--{flag} {getattr(args, flag)!r}: {text!r} is not a number; give fractions, "
                               "e.g. 0.5 or 0.1,0.25,0.5") from None
    else:
        default = isinstance(args.max_capacity_prompts, DefaultBudget)
        for text in str(args.max_capacity_prompts).split(","):
            try:
                budget = DefaultBudget(text) if default else int(text)
            except ValueError:
                raise CLIError(f"--max_capacity_prompts {args.max_capacity_prompts!r}: {text!r} is not an integer; "
                               "give tokens per layer and KV head, e.g. 128 or 64,128,256") from None
            budgets.append(({"max_capacity_prompts": budget}, budget))
    if not methods or not budgets:
        raise CLIError("--method and --max_capacity_prompts need at least one value each")
    names = [check_method(m) for m in methods]
    own_flags = _per_method_flags(args, names, ratio_flags)
    expanded, seen = [], set()
    for changes, budget in budgets:
        for name in names:
            # a self-sized method runs once, unless the swept ratio is one of its own parameters
            # (l2_compress's keep_ratio, fix_size_l2's protected recent share): then once per value
            own_ratio = bool(ratio_flags) and method_flags.takes_ratio(name, ratio_flags[0])
            once = name == "FullKV" or (method_flags.sizes_own_cache(name) and not own_ratio)
            key = (name, None if once else budget)
            if key in seen:
                continue
            seen.add(key)
            method_changes = changes
            if once and ratio_flags and name != "FullKV":  # not a self-sized method's parameters
                method_changes = {flag: None for flag in ratio_flags}
            expanded.append(argparse.Namespace(**{**vars(args), "method": name, **own_flags[name], **method_changes}))
    return expanded


def _per_method_flags(args, names: list[str], ratio_flags: list[str]) -> dict:
    """With several methods in a sweep, a method parameter flag goes to the methods that have that
    parameter (`--method fix_size_l2,h2o_l2 --fix_kv_size 400 --heavy_hitter_size 48`): per method, the
    flags to blank. A flag that none of them has is a one-line error (one method alone: its own check)."""
    import pyramidkv
    if len(set(names)) < 2:
        return {name: {} for name in names}
    keys = {name: set(pyramidkv.config_keys(name)) for name in names}
    blank = {name: {} for name in names}
    for field in method_flags.method_fields():
        if field.name in ratio_flags or getattr(args, field.flag, None) is None:
            continue
        owners = [name for name in names if field.name in keys[name]]
        if not owners:
            raise CLIError(f"--{field.flag} is a parameter of none of {', '.join(names)}; it belongs to "
                           f"{', '.join(cls for cls, _ in field.owners)}")
        for name in names:
            if field.name not in keys[name]:
                blank[name][field.flag] = None
    return blank

