"""Sharded runs: several processes (``accelerate launch --num_processes N`` or ``torchrun``) split one
runner invocation's samples, each writing only its own part files, merged afterwards.

Split: the runner's sample list (every sample of a task or dataset, finished or not) is dealt out by
position, sample i to process ``i % N``, so every process knows its share without talking to the others
and the split never depends on what is already done. Rank and world size come from the launcher's
environment (RANK / WORLD_SIZE, as accelerate's PartialState reads them); no process group is started.

Files: process r of N appends to ``{Method}.json.part{r}of{N}`` beside the results file
``{Method}.json``. A sample counts as finished when its id is in the results file or in ANY part file
(whatever N wrote it), so a rerun, sharded or not, with any N, skips it.

Locks (fcntl, on the results file's ``.lock``): a one-process run holds it exclusively; each process of
a sharded run holds it shared plus its own part's ``.lock`` exclusively. Merging needs it exclusively:
no process can be writing then, so merge_parts folds every part into the results file (ids it already
has are skipped: a merge killed between its append and its unlink leaves only repeats) and deletes the
parts. The last process to finish gets the exclusive lock and merges; eval.py merges too, so a run
whose processes were killed loses no finished sample.
"""
from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
from dataclasses import dataclass

from .predict import CLIError

logger = logging.getLogger("pyramidkv.predict")
PART_RE = re.compile(r"\.part(\d+)of(\d+)$")
LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class Shard:
    """Which share of the samples this process predicts: sample i when i % world == rank."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def owns(self, position: int) -> bool:
        return position % self.world == self.rank

    def describe(self) -> str:
        return f"process {self.rank} of {self.world}" if self.sharded else "one process"


def _env_int(environ, name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise CLIError(f"environment variable {name}={text!r} is not an integer (set by accelerate launch / "
                       "torchrun; unset it for a one-process run)") from None


def current_shard(environ=None) -> Shard:
    """The Shard the launcher's environment describes (one process when WORLD_SIZE is unset)."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise CLIError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process: need 0 <= RANK < WORLD_SIZE")
    local_world = _env_int(environ, "LOCAL_WORLD_SIZE", world)
    local_rank = _env_int(environ, "LOCAL_RANK", rank)
    return Shard(rank, world, local_rank, local_world)


def refuse_sharding(runner: str, environ=None) -> None:
    """For a runner that does not split its samples: two launched processes would write one file."""
    shard = current_shard(environ)
    if shard.sharded:
        raise CLIError(f"{runner} does not split its samples across processes ({shard.describe()}); run it as "
                       "one process (python ...), or use run_longbench.py / run_ruler.py under accelerate launch")


# ---- files --------------------------------------------------------------------------------------
def part_path(path: str, shard: Shard) -> str:
    """Where `shard` writes the records of results file `path`."""
    return f"{path}.part{shard.rank}of{shard.world}" if shard.sharded else path


def part_files(path: str) -> list[str]:
    """Existing part files of results file `path` (any world size), in (world, rank) order."""
    found = [p for p in glob.glob(glob.escape(path) + ".part*of*") if PART_RE.search(p)]
    return sorted(found, key=lambda p: tuple(int(n) for n in PART_RE.search(p).groups()[::-1]))


def is_part_file(name: str) -> bool:
    return bool(PART_RE.search(name))


def results_file_of(name: str) -> str:
    """`SnapKV.json` for `SnapKV.json.part1of2` (a name without a part suffix as is)."""
    return PART_RE.sub("", name)


def complete_records(path: str, key: str):
    """(id, raw line) of every complete line of a jsonl file that parses and has `key`, read only: a
    last line without its newline is being written (or was cut by a kill) and is not a record yet."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            record = json.loads(line.decode("utf-8")) if line.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # eval.py reports bad lines with their line number
        if isinstance(record, dict) and key in record:
            yield record[key], line


def done_ids(path: str, key: str, shard: Shard) -> set:
    """Ids finished in results file `path` or any of its parts. The file this process writes is read
    with result_files.load_done_ids (which drops a cut last line: this process holds its lock); every
    other file is only read."""
    from .result_files import load_done_ids
    own = part_path(path, shard)
    done = load_done_ids(own, key=key)
    for other in [path, *part_files(path)]:
        if other != own:
            done.update(i for i, _ in complete_records(other, key))
    return done


# ---- merging ------------------------------------------------------------------------------------
def _try_lock(lock_path: str):
    """An fd holding lock_path exclusively, or None when another process holds it (shared or not)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def merge_parts(path: str, key: str) -> bool | None:
    """Fold every part file of `path` into it and delete the parts: True when merged, None when there
    were no parts, False when they stay: a run still writes (its lock is held) or the directory cannot
    be written (nothing lost: a half-done merge leaves only repeats, skipped next time)."""
    if not part_files(path):
        return None
    try:
        return _merge_locked(path, key)
    except OSError as err:
        logger.warning("cannot merge the part files of %s (%s); they stay beside it", path, err.strerror or err)
        return False


def _merge_locked(path: str, key: str) -> bool:
    fd = _try_lock(path + LOCK_SUFFIX)
    if fd is None:
        return False
    try:
        parts = part_files(path)  # again, under the lock
        from .result_files import load_done_ids
        seen = load_done_ids(path, key=key)  # drops a cut last line: nobody else writes it now
        added = []
        for part in parts:
            for sample_id, line in complete_records(part, key):
                if sample_id not in seen:
                    seen.add(sample_id)
                    added.append(line + b"\n")
        if added:
            with open(path, "ab") as f:
                f.write(b"".join(added))
                f.flush()
                os.fsync(f.fileno())
        for part in parts:  # after the fsync: a kill before this leaves only repeats, skipped next time
            os.unlink(part)
            try:  # no part writer can start while we hold the results file's lock (writers take it first)
                os.unlink(part + LOCK_SUFFIX)
            except FileNotFoundError:
                pass
        logger.info("merged %d part file(s) into %s (%d new records)", len(parts), path, len(added))
        return True
    finally:
        os.close(fd)


def merge_all(paths: list[str], key: str) -> list[str]:
    """merge_parts for each results file; returns the files whose parts a running process still writes."""
    return [path for path in dict.fromkeys(paths) if merge_parts(path, key) is False]


def merge_at_end(paths: list[str], key: str, shard: Shard) -> None:
    """A runner's last step: merge what no process writes any more (the last process of a sharded run
    merges every part; earlier ones leave theirs to it; a one-process run folds leftover parts of an
    earlier sharded run)."""
    import sys
    still_written = merge_all(paths, key)
    if still_written and shard.sharded:
        print(f"{shard.describe()} done; {len(still_written)} results file(s) keep their parts until the "
              "last process (or eval.py) merges them", file=sys.stderr, flush=True)
