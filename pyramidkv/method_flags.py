"""Runner flags for every method parameter, generated from the method dataclasses' fields, and the
method config / results-directory budget name the runners derive from them.

The fields are read from the source of pyramidkv/methods/*.py (its syntax tree) instead of by importing
the methods, which import torch: a runner's `--help` stays fast, and a method registered in that
package gets its flags without anyone listing them. The flags that predict.add_common_args writes by
hand (the budget in tokens, the window, pooling, gqa_selection) are left out; a field named like a
runner flag gets a prefix (a method's `seed` is --method_seed, the runner's --seed seeds the samples).
Every generated flag defaults to None = the method's own default.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import re
from dataclasses import dataclass

METHODS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods")
HAND_WRITTEN = ("max_capacity_prompt", "window_size", "kernel_size", "pooling", "gqa_selection")
RENAMED = {"seed": "method_seed"}  # field -> flag where the runner already has the field's name
# field -> more flag spellings: CaM's code calls H2O's heavy budget "start" (--start_ratio 0.1 --recent_ratio 0.1)
ALIASES = {"heavy_ratio": ("start_ratio",)}
# budgets as fractions of each row's prompt: with one given, the default --max_capacity_prompts is left out
RATIO_BUDGETS = ("compress_ratio", "keep_ratio", "heavy_ratio", "recent_ratio")


class CLIError(ValueError):
    """A user-facing problem reported as one line (bad flag value, missing file, ...)."""


def check_method(name: str) -> str:
    """The canonical name of a method (any case, the library's aliases too); one-line CLIError on an
    unknown name. Runners use it for file names and run_meta keys, so `snapkv` resumes `SnapKV.json`."""
    import pyramidkv
    try:
        return pyramidkv.canonical_name(name)
    except ValueError as err:
        raise CLIError(str(err)) from None


class DefaultBudget(int):
    """--max_capacity_prompts' default (128): an int that says it was not given, so a ratio budget
    (--compress_ratio / --keep_ratio) and methods that size their own cache can leave it out."""


@dataclass
class MethodField:
    name: str
    annotation: str  # as written, e.g. "float | None"
    owners: list  # (class name, default as written)

    @property
    def flag(self) -> str:
        return RENAMED.get(self.name, self.name)

    def parser(self):
        if any(word in self.annotation for word in ("Sequence", "tuple", "list")):
            return _int_or_list
        for text, kind in (("bool", _boolean), ("float", float), ("int", int)):
            if text in self.annotation:
                return kind
        return str


def _int_or_list(text: str):
    """'2' -> 2 (a count), '0,1' -> [0, 1] (indices), '' -> []."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma list of integers") from None
    return values[0] if len(values) == 1 and "," not in text else values


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; valid: true, false")


@functools.lru_cache(maxsize=1)
def method_fields() -> tuple[MethodField, ...]:
    """Every dataclass field of the method classes (ClassVars excluded), merged by name."""
    merged: dict[str, MethodField] = {}
    classes = []  # (class node, names of its bases) of every dataclass in the package
    for file in sorted(os.listdir(METHODS_DIR)):
        if not file.endswith(".py"):
            continue
        with open(os.path.join(METHODS_DIR, file), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        classes += [(node, [ast.unparse(base).split(".")[-1] for base in node.bases]) for node in tree.body
                    if isinstance(node, ast.ClassDef)
                    and any("dataclass" in ast.unparse(decorator) for decorator in node.decorator_list)]
    # only methods: KVMethod and its subclasses; the inputs/results records (PrefillInputs, Eviction, ...)
    # are dataclasses of tensors, not settings
    methods, grew = {"KVMethod"}, True
    while grew:
        grew = False
        for node, bases in classes:
            if node.name not in methods and methods.intersection(bases):
                methods.add(node.name)
                grew = True
    for node, _ in classes:
        if node.name in methods:
            for item in node.body:
                    if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                        continue
                    annotation = ast.unparse(item.annotation)
                    if "ClassVar" in annotation:
                        continue
                    default = ast.unparse(item.value) if item.value is not None else "required"
                    field = merged.setdefault(item.target.id, MethodField(item.target.id, annotation, []))
                    if annotation != field.annotation:
                        field.annotation += f" | {annotation}"
                    field.owners.append((node.name, default))
    return tuple(merged[name] for name in sorted(merged) if name not in HAND_WRITTEN)


def add_method_flags(group, lists: tuple = ()) -> None:
    """One --flag per method field (default None: the method's own default); the fields in `lists`
    take a comma list (a runner's sweep expands it)."""
    for field in method_fields():
        owners = ", ".join(f"{cls} {default}" for cls, default in field.owners)
        listed = field.name in lists
        aliases = [f"--{alias}" for alias in ALIASES.get(field.name, ())]
        group.add_argument(f"--{field.flag}", *aliases, dest=field.flag, type=str if listed else field.parser(), default=None,
                           help=f"method parameter {field.name} ({field.annotation}{'; comma list' if listed else ''}); "
                                f"defaults: {owners}")


def given_method_values(args) -> dict:
    """{field: value} of the generated flags that were given."""
    values = {}
    for field in method_fields():
        value = getattr(args, field.flag, None)
        if value is not None:
            values[field.name] = value
    return values


def sizes_own_cache(method: str) -> bool:
    """True for a method sized by its own parameters (CS3602's, streaming_llm, recent_only)."""
    import pyramidkv
    from pyramidkv.methods import PARAMETER_ALIASES
    try:
        name = pyramidkv.canonical_name(method)
    except ValueError:
        return False
    return name in PARAMETER_ALIASES or getattr(pyramidkv.METHODS[name], "sizes_own_cache", False)


def budget_name(args) -> str:
    """The budget in a results directory name ({save_dir}/{model}_{budget}): tokens ("128", as before),
    "compress0.4" / "keep0.6" for a ratio, "own" for a method that sizes its cache itself (its size
    parameters are in the stored settings); "128_kivi4" when quantized (see _quant_words),
    "64_evictSnapKV" for CommonKV + eviction, "128_whitened" for CommonKV's whitened factors."""
    return _budget_words(args) + _evict_words(args) + _factor_words(args) + _quant_words(args)


def _factor_words(args) -> str:
    """"_whitened" for CommonKV's activation-aware factors, so they never share a directory name with the
    default weight-SVD runs; "" otherwise (the default keeps the names results already have)."""
    return "_whitened" if getattr(args, "factorization", None) == "whitened" else ""


def parse_budget_names(text: str) -> list:
    """The budgets of a sweep table as budget_name writes them: "64,keep0.25,512_kivi4" ->
    [64, "keep0.25", "512_kivi4"] (token counts stay ints). ValueError names a bad entry."""
    names = [b.strip() for b in text.replace(" ", ",").split(",") if b.strip()]
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9._]+", name):
            raise ValueError(f"bad --budgets entry {name!r}; expected budget names as in the results "
                             "directories: 128, keep0.25, compress0.4, 512_kivi4, own")
    if not names:
        raise ValueError(f"bad --budgets {text!r}; expected a comma list such as 128,512 or keep0.1,keep0.5")
    return [int(n) if n.isdigit() else n for n in names]


def _evict_words(args) -> str:
    """"_evictSnapKV" when CommonKV evicts with another method, so those results never share a directory
    name with CommonKV runs that keep every latent; "" otherwise."""
    evict = getattr(args, "evict_method", None)
    if evict in (None, "", "none", "None"):
        return ""
    import pyramidkv

    try:
        evict = pyramidkv.canonical_name(evict)
    except ValueError:
        pass  # the method's own check names the valid choices
    return f"_evict{evict}"


def takes_ratio(method: str, flag: str) -> bool:
    """True when a self-sized method uses the ratio flag as one of its own parameters (l2_compress's
    keep_ratio, fix_size_l2's protected recent share); the others refuse it (one-line ValueError)."""
    import pyramidkv
    if not sizes_own_cache(method):
        return False
    try:
        pyramidkv.build_method(method, **{flag: 0.5})
    except ValueError:
        return False
    return True


def _budget_words(args) -> str:
    if sizes_own_cache(args.method):
        words = [f"{word}{getattr(args, flag):g}" for flag, word in (("compress_ratio", "compress"), ("keep_ratio", "keep"))
                 if getattr(args, flag, None) is not None and takes_ratio(args.method, flag)]
        return "_".join(["own", *words])
    if getattr(args, "heavy_ratio", None) is not None or getattr(args, "recent_ratio", None) is not None:
        words = [f"{word}{getattr(args, flag):g}" for flag, word in (("heavy_ratio", "heavy"), ("recent_ratio", "recent"))
                 if getattr(args, flag, None) is not None]
        return "_".join(words)  # H2O's ratio form, e.g. heavy0.1_recent0.1
    for flag, word in (("compress_ratio", "compress"), ("keep_ratio", "keep")):
        if getattr(args, flag, None) is not None:
            return f"{word}{getattr(args, flag):g}"
    return str(args.max_capacity_prompts)


def _quant_words(args) -> str:
    """"_kivi4" (and "_g64" / "_r16" for a non-default group_size / residual_length) when quantized, so
    quantized results never share a directory name with unquantized ones; "" otherwise."""
    if getattr(args, "quant_method", None) in (None, "none"):
        return ""
    words = f"_{args.quant_method}{getattr(args, 'nbits', None) or 4}"
    for flag, letter in (("group_size", "g"), ("residual_length", "r")):
        if getattr(args, flag, None) not in (None, 32):
            words += f"_{letter}{getattr(args, flag)}"
    return words


def method_config(args) -> dict:
    """Keyword arguments for pyramidkv.compress built from the common flags and the method flags given.

    Budget: max_capacity_prompt, unless --compress_ratio / --keep_ratio is given (then the tokens flag
    only if given too, which the method refuses as two budgets). A method that sizes its cache with its
    own parameters (CS3602's, streaming_llm, recent_only) gets the window, pooling and budget flags only
    when they were given."""
    config = {"window_size": args.window_size, "kernel_size": args.kernel_size, "pooling": args.pooling}
    given = given_method_values(args)
    given.update({k: getattr(args, k) for k in ("gqa_selection",) if getattr(args, k, None) is not None})
    budget_given = not isinstance(args.max_capacity_prompts, DefaultBudget)
    if budget_given or not any(k in given for k in RATIO_BUDGETS):
        config = {"max_capacity_prompt": int(args.max_capacity_prompts), **config}
    if sizes_own_cache(args.method):
        defaults = {"max_capacity_prompt": None if budget_given else int(args.max_capacity_prompts),
                    "window_size": 8, "kernel_size": 7, "pooling": "maxpool"}
        config = {k: v for k, v in config.items() if defaults.get(k) != v}
    config.update(given)
    return config
