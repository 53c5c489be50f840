"""Per-sample jsonl files: resumable prediction outputs (append + fsync, finished ids) and input readers.

A run appends one JSON line per sample and flushes it, so a crash loses at most the sample in flight;
a rerun reads the finished ids and skips them.
"""
from __future__ import annotations

import json
import logging
import os

from .predict import CLIError

logger = logging.getLogger("pyramidkv.predict")


def load_done_ids(path: str, key: str = "_id") -> set:
    """Ids already written to a jsonl prediction file (empty set when it does not exist).

    A crash mid-write can leave a final line without its newline; that partial line is dropped from
    the file (its sample is then recomputed) so the next append starts on a clean line.
    """
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        logger.warning("dropping truncated last line of %s (interrupted write); it will be recomputed", path)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for line_no, line in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(line.decode("utf-8")) if line.strip() else None
        except UnicodeDecodeError:
            logger.warning("%s:%d: not UTF-8 text; that sample will be recomputed", path, line_no)
            continue
        except json.JSONDecodeError:
            continue  # eval.py reports malformed lines with their line number
        if isinstance(record, dict) and key in record:
            done.add(record[key])
    return done


def iter_jsonl(path: str, required: tuple):
    """(line number, record, error or None, missing required fields) per non-blank line; the error
    describes a line that is not UTF-8 text or not JSON.

    The caller decides what a bad line means: inputs fail (`read_jsonl_strict`), eval.py warns and skips."""
    if os.path.isdir(path):
        raise CLIError(f"{path} is a directory, not a jsonl file")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, None, f"not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})", []
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, None, f"malformed JSON line ({err.msg})", []
                continue
            missing = [k for k in required if not isinstance(record, dict) or k not in record]
            yield line_no, record, None, missing


def read_jsonl_strict(path: str, required: tuple, what: str) -> list[dict]:
    """Records of an input jsonl file; a bad line or a missing field is a one-line error (file:line)."""
    records = []
    for line_no, record, error, missing in iter_jsonl(path, required):
        if error is not None:
            raise CLIError(f"{path}:{line_no}: {error}")
        if missing:
            raise CLIError(f"{path}:{line_no}: missing field(s) {', '.join(missing)} "
                           f"(a {what} line needs {', '.join(required)})")
        records.append(record)
    return records


def append_jsonl(path: str, record: dict) -> None:
    """Append one record as a JSON line and push it to disk before returning."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
