"""Who may write a results directory, checked before any model loads.

A results directory ({save_dir}/{model}_{budget}) holds one {Method}.json per dataset or task and a
run_meta.json with one entry per method. A method's results files belong to ONE setting (`run_settings`:
the full method config, the model fingerprint and every protocol choice that can change a
prediction). A rerun with the same setting resumes (finished ids are skipped); a rerun with another
setting while that method's results files exist is refused with the differing settings, since
resuming would mix predictions made two ways in one file. Other methods may join the directory.
While a run writes a results file it holds `{file}.lock` (fcntl, non-blocking), so a second run of
the same method into the same file fails at once and is told who holds it. The processes of a sharded
run (pyramidkv.sharding) hold that lock shared and each its own part file's lock exclusively; their part
files ({file}.part{r}of{N}) count as results files of the method here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import importlib
import json
import os
import platform
import sys

from .predict import REPO_ROOT as _REPO_ROOT
from .predict import CLIError
from .sharding import Shard, part_path, results_file_of

RUN_META = "run_meta.json"
LOCK_SUFFIX = ".lock"


# ---- the setting a results file belongs to --------------------------------------------------------
def run_settings(args, protocol: dict) -> dict:
    """Everything that can change a prediction, flat (so differences read as `seed 42 -> 7`).

    The method's full config comes from the built method, so its defaults (beta, sink_size, ...) and any
    field added later are part of it. dtype and device are resolved ("auto" is bfloat16 on cuda).
    Not part of it: --eval_batch_size (a left-padded row equals its single run for every method, a
    library guarantee with tests, so a killed run may resume with another batch size; run_meta records
    it), --num_threads, and which tasks / lengths / datasets / how many samples (they choose files and
    ids, not what one prediction is)."""
    import pyramidkv
    from . import predict

    method = pyramidkv.build_method(args.method, **predict.method_config(args))
    device = predict.resolve_device(getattr(args, "device", "auto"))
    settings = {"method": method.name}
    settings.update({f.name: getattr(method, f.name) for f in dataclasses.fields(method)})
    resolved = predict.resolve_model(args)
    settings.update({
        "model": resolved.fingerprint() or resolved.path,  # a hub id cannot be fingerprinted offline
        "seed": args.seed,
        "chat_template": args.chat_template,
        "dtype": str(predict.resolve_dtype(args.dtype, device)).replace("torch.", ""),
        "device": device,
        "attn_implementation": args.attn_implementation,
    })
    settings.update(protocol)
    return json.loads(json.dumps(settings))  # the form it has once read back from run_meta.json


def settings_diff(old: dict, new: dict) -> str:
    """'seed 42 -> 7, window_size 8 -> 32' for the settings that differ ('' when none).

    A method field added after the old results were made is absent from their record; it matches when
    the new value is that field's default (a field is only added with a default that keeps the old
    behaviour), so a library upgrade does not orphan half-finished sweeps."""
    added_defaults = _method_defaults(new.get("method"))
    keys = list(new) + [k for k in old if k not in new]
    return ", ".join(f"{k} {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                     for k in keys if old.get(k) != new.get(k)
                     and not (k not in old and k in added_defaults and new.get(k) == added_defaults[k]))


def _method_defaults(name) -> dict:
    """{field: default} of a method's dataclass fields (JSON form); {} for an unknown name."""
    import pyramidkv
    try:
        cls = type(pyramidkv.build_method(name))
    except (ValueError, TypeError):
        return {}
    return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cls)
                                  if f.default is not dataclasses.MISSING}, default=str))


# ---- save dir and run_meta.json -------------------------------------------------------------------
def check_writable(save_dir: str, directory: str | None = None) -> None:
    """One-line error when `directory` (default: save_dir itself), the results directory under
    --save_dir, cannot be created or written; creates nothing."""
    target = os.path.abspath(directory or save_dir)
    ancestor = target
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        where = "is a file" if ancestor == target else f"is under {ancestor}, which is a file"
        raise CLIError(f"--save_dir {save_dir}: {target} {where}, not a directory; pass another directory")
    read_only = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
    if read_only or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is on a read-only filesystem" if read_only else "is not writable"
        raise CLIError(f"--save_dir {save_dir} cannot be written: {ancestor} {why}; pass another directory")


def make_dirs(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create {directory}: {err.strerror or err}; pass another --save_dir") from None


def read_run_meta(directory: str) -> dict:
    """{method: entry} of directory/run_meta.json ({} when there is none); one-line error naming a
    corrupt file."""
    path = os.path.join(directory, RUN_META)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CLIError(f"{path} is not readable JSON ({err}); repair or delete it (it records how the "
                       "results beside it were made) or pass another --save_dir") from None
    if not isinstance(meta, dict) or not all(isinstance(e, dict) for e in meta.values()):
        raise CLIError(f"{path} is not a run_meta.json (expected an object of per-method entries); "
                       "repair or delete it or pass another --save_dir")
    return meta


def same_method(name: str, method: str) -> bool:
    """Whether a file stem or run_meta key names `method` (any case, aliases included)."""
    import pyramidkv
    try:
        return pyramidkv.canonical_name(name) == method
    except ValueError:  # results.json, other files
        return False


def method_results_files(directory: str, method: str) -> list[str]:
    """Non-empty results files of `method` in a results directory (LongBench: {dataset}/{M}.json,
    RULER: {length}/{task}/{M}.json), any spelling of the method name."""
    found = []
    if not os.path.isdir(directory):
        return found
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        if root == directory:
            continue  # results.json / run_meta.json live at the top
        for name in sorted(files):
            path = os.path.join(root, name)
            stem = results_file_of(name)  # a sharded run's part files count as its results files
            if stem.endswith(".json") and same_method(stem[:-5], method) and os.path.getsize(path) > 0:
                found.append(path)
    return found


def check_settings(directory: str, settings: dict, fingerprint: str | None, meta: dict | None = None) -> None:
    """Refuse to write `settings["method"]` into a directory whose results were made otherwise.

    fingerprint: the model's (None for a hub id); every method in one directory must share it."""
    method = settings["method"]
    meta = read_run_meta(directory) if meta is None else meta
    # a rerun skips finished ids, which is only right if they were predicted by this same checkpoint
    other = sorted({e.get("model_fingerprint") for e in meta.values()} - {None, fingerprint})
    if other and fingerprint:
        raise CLIError(f"{directory} holds results of another checkpoint with the same name (fingerprint "
                       f"{other[0]}, now {fingerprint}): pass another --save_dir or remove that directory")
    files = method_results_files(directory, method)
    if not files:
        return  # nothing to mix with: the new setting replaces the old entry
    entry = next((e for k, e in meta.items() if same_method(k, method)), None)
    delete = f"delete its {len(files)} results file(s) ({files[0]}{', ...' if len(files) > 1 else ''})"
    if (entry is None or "settings" not in entry) and all(".part" in os.path.basename(f) for f in files):
        # only part files and no record yet: another process of this same sharded launch started
        # predicting before process 0 wrote run_meta.json (it always does, before predicting itself)
        return
    if entry is None or "settings" not in entry:
        raise CLIError(f"{directory} holds {method} results without a record of their settings in "
                       f"{RUN_META}; pass another --save_dir, or {delete} to start over")
    diff = settings_diff(entry["settings"], settings)
    if diff:
        raise CLIError(f"{directory} holds {method} results made with other settings ({diff}); pass another "
                       f"--save_dir, or {delete} to start over")


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # not installed as a distribution (e.g. source checkout without pip install)
        return None


def _module_version(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", None)
    except ImportError:
        return None


def write_run_meta(directory: str, args, extra: dict, settings: dict | None = None) -> None:
    """Record how predictions were made in {directory}/run_meta.json, keyed by canonical method name.

    Several methods share one results directory, so each method keeps its own entry; a rerun of a
    method moves the previous entry into its "previous_runs" list instead of overwriting it. `settings`
    (results_dir.run_settings; derived from args when None) is what a later rerun must match; the check
    that runners make before loading the model is repeated here under the file's lock.
    """
    import torch
    import transformers

    from . import predict

    args.method = predict.check_method(args.method)
    settings = run_settings(args, {}) if settings is None else settings
    resolved = predict.resolve_model(args)
    make_dirs(directory)
    path = os.path.join(directory, RUN_META)
    device = predict.resolve_device(getattr(args, "device", "auto"))
    entry = {
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "args": {k: v for k, v in sorted(vars(args).items())},
        "method": args.method,
        "method_config": predict.method_config(args),
        "settings": settings,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pyramidkv": _package_version("pyramidkv") or _module_version("pyramidkv"),
            "git_commit": _git_commit(),
        },
        "device": device if device == "cpu" else f"cuda:{torch.cuda.get_device_name(0)}",
        "protocol": extra,
        "model": {"spec": args.model_path, "resolved": resolved.describe()},
        "model_fingerprint": resolved.fingerprint(),
    }
    lock = os.open(directory, os.O_RDONLY)  # concurrent runs of different methods share this file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = read_run_meta(directory)
        check_settings(directory, settings, entry["model_fingerprint"], meta)
        previous = [meta.pop(k) for k in list(meta) if same_method(k, args.method)]
        if previous:  # older files may hold the same method under another spelling ("snapkv")
            history = [run for p in previous for run in p.pop("previous_runs", []) + [p]]
            entry["previous_runs"] = sorted(history, key=lambda run: str(run.get("started_at")))
        meta[args.method] = entry
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False, default=str)
        os.replace(tmp, path)
    finally:
        os.close(lock)  # closing releases the lock


def _git_commit() -> str | None:
    head = os.path.join(_REPO_ROOT, ".git", "HEAD")
    try:
        with open(head) as f:
            ref = f.read().strip()
        if ref.startswith("ref: "):
            with open(os.path.join(_REPO_ROOT, ".git", ref[5:])) as f:
                return f.read().strip()
        return ref
    except OSError:
        return None


# ---- one writer per results file ----------------------------------------------------------------
def _holder(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        text = ""
    return text[:200] or "unknown process"


def _acquire(lock_path: str, exclusive: bool, path: str, who: str) -> int:
    """An fd holding lock_path (exclusive or shared, non-blocking); one-line error naming the holder."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CLIError(f"cannot create lock file {lock_path}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CLIError(f"{path} is being written by another run ({_holder(lock_path)}); wait for it "
                       "to finish or pass another --save_dir") from None
    if exclusive:  # shared holders (a sharded run's processes) leave the first one's line
        os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} ({who}): {' '.join(sys.argv)}\n".encode())
    return fd


@contextlib.contextmanager
def locked(paths: list[str], shard=None):
    """Hold `{path}.lock` for every results file a run will write, for the whole run.

    One process: exclusively. A process of a sharded run (pyramidkv.sharding): `{path}.lock` shared (the
    other processes hold it too, a one-process run or a merge cannot start) and its own part file's
    `.lock` exclusively. Non-blocking: when another run holds one, fail at once naming its pid and
    command. Lock files say who holds them and are left in place (the kernel drops a dead holder's
    lock, so a stale file never blocks; removing it could race with a run that just opened it)."""
    shard = shard or Shard()
    held = []
    try:
        for path in dict.fromkeys(paths):  # a task or dataset named twice is one file
            if os.path.isdir(path):
                raise CLIError(f"results file {path} is a directory; remove it or pass another --save_dir")
            make_dirs(os.path.dirname(os.path.abspath(path)))
            held.append(_acquire(path + LOCK_SUFFIX, not shard.sharded, path, shard.describe()))
            if shard.sharded:
                part = part_path(path, shard)
                held.append(_acquire(part + LOCK_SUFFIX, True, part, shard.describe()))
        yield
    finally:
        for fd in held:
            os.close(fd)  # closing releases the lock
