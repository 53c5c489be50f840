"""Summarization data for run_summarization.py: datasets, split slicing, local files, hub, smoke sample.

Sources, in the order `--data_source auto` tries them:
1. a local file: `--dataset path/to/file.{jsonl,json,parquet,arrow}`, or `{data_dir}/{dataset}/{split}.{ext}`
   (the layout `Dataset.to_json` exports) or `{data_dir}/{dataset}.{ext}` (LongBench's
   `data/LongBench/gov_report.jsonl`); one file is one split, `--split` only slices it;
2. the Hugging Face hub through `datasets` (its cache first: offline machines fall back in seconds);
3. the bundled smoke sample `data/summarization_smoke/news.jsonl`: 10 self-written fictional news
   articles with reference summaries, NOT any of the real datasets.

Splits use the `datasets` slicing syntax ("test", "test[:100]", "validation[10:20]", "test[:10%]",
"train[:5]+train[-5:]"); unlike `datasets`, a slice past the end of the split is an error, so a run never
silently evaluates fewer samples than asked.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
from dataclasses import dataclass

from .predict import REPO_ROOT, CLIError

SMOKE_FILE = os.path.join(REPO_ROOT, "data", "summarization_smoke", "news.jsonl")
LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
DATA_SOURCES = ("auto", "local", "hub", "smoke")
DEFAULT_SPLIT = "test[:10]"  # the whole smoke sample; 10 samples of a hub split
_LONGBENCH_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "longbench",
                                  "dataset2prompt.json")


def _longbench_prompt(name: str) -> str:
    with open(_LONGBENCH_PROMPTS, encoding="utf-8") as f:
        return json.load(f)[name].replace("{context}", "{document}")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str | None
    hub_config: str | None
    document_field: str
    summary_field: str
    id_field: str | None
    max_prompt_tokens: int  # prefill budget: the document is cut from its end to fit
    max_new_tokens: int
    prompt: str  # {document} is replaced by the (truncated) document
    budget_source: str


# HELM's summarization prompts (the data CaM evaluates on) for the news sets; LongBench's official
# prompts for its two summary sets. Budgets: SimCalKV's nums_token defaults where it has them.
DATASETS = {
    "cnn_dailymail": DatasetSpec(
        "cnn_dailymail", "cnn_dailymail", "3.0.0", "article", "highlights", "id", 1024, 64,
        "###\nArticle: {document}\n\nSummarize the above article in 3 sentences.",
        "SimCalKV (nums_token1024+64)"),
    "xsum": DatasetSpec(
        "xsum", "xsum", None, "document", "summary", "id", 512, 64,
        "###\nArticle: {document}\n\nSummarize the above article in 1 sentence.",
        "SimCalKV (nums_token512+64)"),
    "multi_news": DatasetSpec(
        "multi_news", "multi_news", None, "document", "summary", None, 2048, 512,
        _longbench_prompt("multi_news"),
        "chosen here: 2048 prompt tokens (half GovReport's; Multi-News inputs average ~2.1k words), "
        "512 new tokens = LongBench's max for multi_news"),
    "LongBench/gov_report": DatasetSpec(
        "LongBench/gov_report", "THUDM/LongBench", "gov_report", "context", "answers", "_id", 4096, 512,
        _longbench_prompt("gov_report"), "SimCalKV (nums_token4096+512)"),
}
# CaM's / H2O's task names in their data file names (data/cnndm_0shot.jsonl)
TASK_ALIASES = {"cnn_dailymail": ("cnndm", "cnn"), "xsum": ("xsum",), "multi_news": ("multi_news",)}
# HELM-style files (H2O's and CaM's data/{task}_{shot}shot.jsonl): "article" holds the complete prompt,
# "summary_gt" the reference; optional "max_tokens" and "stop" per request
HELM_FIELDS = ("article", "summary_gt")
# field pairs recognised in a local file that is not named after a known dataset
GENERIC_FIELD_PAIRS = (("article", "highlights"), ("document", "summary"), ("context", "answers"))
GENERIC_SPEC = DatasetSpec("local", None, None, "document", "summary", None, 1024, 64,
                           "###\nArticle: {document}\n\nSummarize the above article in 3 sentences.",
                           "CNN/DM's defaults (a local file of unknown kind)")


@dataclass(frozen=True)
class SplitPart:
    name: str
    start: str | None  # "10", "-5", "10%" or None
    stop: str | None


@dataclass
class Samples:
    rows: list[dict]  # {"id", "document", "reference", "row"} per selected sample
    spec: DatasetSpec
    source: str  # "local", "hub" or "smoke"
    description: str  # where they came from, printed and stored in the config
    split: str  # the --split applied (resolved when not given)


_BOUND = r"(-?\d+%?)?"
_PART = re.compile(rf"^\s*(\w[\w.-]*)\s*(?:\[\s*{_BOUND}\s*:\s*{_BOUND}\s*\])?\s*$")


def parse_split(split: str) -> list[SplitPart]:
    """'test[:100]+test[-5:]' -> parts; one-line CLIError naming the bad part otherwise."""
    parts = []
    for text in split.split("+"):
        match = _PART.match(text)
        if not match:
            raise CLIError(f"bad --split {split!r} (part {text.strip()!r}); use the datasets slicing syntax: "
                           "test, test[:100], validation[10:20], test[:10%], train[:5]+train[-5:]")
        name, start, stop = match.groups()
        parts.append(SplitPart(name, start, stop))
    return parts


def _bound(text: str | None, n: int, default: int, split: str, what: str) -> int:
    if text is None:
        return default
    if text.endswith("%"):
        percent = int(text[:-1])
        if abs(percent) > 100:
            raise CLIError(f"--split {split!r}: {text} is not a percentage between -100% and 100%")
        value = round(abs(percent) * n / 100)
        return n - value if percent < 0 else value
    value = int(text)
    if abs(value) > n if value < 0 else value > n:
        raise CLIError(f"--split {split!r} reaches past the end of {what} ({n} rows): "
                       f"ask for at most {n} rows")
    return n + value if value < 0 else value


def select_rows(parts: list[SplitPart], num_rows: int, split: str, what: str) -> list[int]:
    """Row indices the slices select from a split of num_rows rows (in order, repeats dropped)."""
    rows, seen = [], set()
    for part in parts:
        start = _bound(part.start, num_rows, 0, split, what)
        stop = _bound(part.stop, num_rows, num_rows, split, what)
        for index in range(start, max(start, stop)):
            if index not in seen:
                seen.add(index)
                rows.append(index)
    if not rows:
        raise CLIError(f"--split {split!r} selects no rows of {what} ({num_rows} rows)")
    return rows


def resolve_spec(dataset: str) -> tuple[DatasetSpec, str | None]:
    """(spec, local file or None). A path names a local file; its stem picks a known dataset's spec."""
    if os.path.isfile(dataset):
        stem = os.path.basename(dataset).split(".")[0].lower()
        for spec in DATASETS.values():
            for short in {spec.name.split("/")[-1].lower(), *TASK_ALIASES.get(spec.name, ())}:
                if stem == short or stem.startswith((short + "_", short + "-")):
                    return spec, dataset
        return GENERIC_SPEC, dataset
    for name, spec in DATASETS.items():
        if dataset.lower() == name.lower():
            return spec, None
    if dataset.lower().endswith(LOCAL_EXTENSIONS) or os.sep in dataset:
        raise CLIError(f"--dataset {dataset!r}: no such file")
    raise CLIError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}, or a local "
                   f"file ({', '.join(LOCAL_EXTENSIONS)})")


def find_local_file(spec: DatasetSpec, data_dir: str, split_name: str) -> str | None:
    """{data_dir}/{dataset}/{split}.{ext} or {data_dir}/{dataset}.{ext}, the first that exists."""
    for stem in (os.path.join(data_dir, spec.name, split_name), os.path.join(data_dir, spec.name)):
        for ext in LOCAL_EXTENSIONS:
            if os.path.isfile(stem + ext):
                return stem + ext
    return None


# ----------------------------------------------------------------------------- local files
def read_local_records(path: str) -> tuple[list[dict], str]:
    """(records, what a record number means: 'line' or 'row') of a json/jsonl/parquet/arrow file."""
    if path.endswith((".parquet", ".arrow")):
        import datasets
        if path.endswith(".parquet"):
            table = datasets.Dataset.from_parquet(path)
        else:
            table = datasets.Dataset.from_file(path)
        return table.to_list(), "row"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise CLIError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        return records, "record"
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            records.append(None)  # keep numbering = line numbers
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise CLIError(f"{path}:{line_no}: malformed JSON line ({err.msg})") from None
    return records, "line"


def _fields_for(spec: DatasetSpec, first: dict) -> tuple[str, str]:
    if spec is not GENERIC_SPEC:
        return spec.document_field, spec.summary_field
    for document_field, summary_field in GENERIC_FIELD_PAIRS:
        if document_field in first and summary_field in first:
            return document_field, summary_field
    return spec.document_field, spec.summary_field


def _reference_text(value) -> str:
    # LongBench stores the reference as a one-element list
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value)


def records_to_rows(records: list, path: str, unit: str, spec: DatasetSpec,
                    fields: tuple[str, str] | None = None, split_name: str = "") -> list[dict]:
    """Check every record's fields (one-line error naming file, line and field) and normalise them."""
    numbered = [(i + 1, r) for i, r in enumerate(records) if r is not None]
    if not numbered:
        raise CLIError(f"{path}: no records")
    first = numbered[0][1] if isinstance(numbered[0][1], dict) else {}
    helm = fields is None and all(field in first for field in HELM_FIELDS)
    document_field, summary_field = HELM_FIELDS if helm else (fields or _fields_for(spec, first))
    def where(number: int) -> str:  # file:line for text files, "file row N" for tables
        return f"{path}:{number}" if unit == "line" else f"{path} {unit} {number}"

    rows = []
    for index, (number, record) in enumerate(numbered):
        if not isinstance(record, dict):
            raise CLIError(f"{where(number)}: not a JSON object")
        for field in (document_field, summary_field):
            if field not in record or record[field] is None:
                raise CLIError(f"{where(number)}: missing field {field!r} (a summarization record "
                               f"needs {document_field!r} and {summary_field!r})")
        sample_id = record.get(spec.id_field or "id", record.get("id", record.get("_id")))
        row = {"id": str(sample_id) if sample_id is not None else f"{split_name or 'row'}-{index}",
               "document": str(record[document_field]),
               "reference": _reference_text(record[summary_field]), "row": index}
        if helm:  # the prompt is complete; the request may set its own length and stop strings
            row.update(complete_prompt=True, max_new_tokens=record.get("max_tokens"),
                       stop=list(record.get("stop") or []))
        rows.append(row)
    return rows


def load_local(path: str, spec: DatasetSpec, split: str, fields=None) -> list[dict]:
    records, unit = read_local_records(path)
    return records_to_rows(records, path, unit, spec, fields, parse_split(split)[0].name)


# ----------------------------------------------------------------------------- hub
def force_offline() -> None:
    """Make `datasets`/`huggingface_hub` use their caches only (also when already imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attributes in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        loaded = sys.modules.get(module)
        for attribute in attributes:
            if loaded is not None and hasattr(loaded, attribute):
                setattr(loaded, attribute, True)


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when the environment says offline or the hub's host does not answer within timeout."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^\w+://", "", endpoint).split("/")[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(spec: DatasetSpec, hub_id: str, split_name: str) -> tuple[list[dict] | None, str]:
    """(rows, note): rows of the whole named split, or None with the reason the hub gave none."""
    online = hub_reachable()
    if not online:
        force_offline()  # the cache may still hold the dataset; do not wait on the network
    import datasets
    try:
        table = datasets.load_dataset(hub_id, spec.hub_config, split=split_name)
    except Exception as err:  # offline without a cached copy, unknown split, script-only dataset, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not online:
            return None, f"hub unreachable and no cached copy of {hub_id} ({reason})"
        raise CLIError(f"cannot load {hub_id} (config {spec.hub_config}) split {split_name!r} from the "
                       f"hub: {reason}; put the data in a local file (--dataset <file>, or --data_dir) or "
                       "pass --data_source smoke") from None
    records = table.to_list()
    return records_to_rows(records, f"hub:{hub_id}", "row", spec, None, split_name), (
        "cached copy (offline)" if not online else "hub")


# ----------------------------------------------------------------------------- entry point
def load_samples(dataset: str, split: str | None, data_dir: str, data_source: str = "auto",
                 hub_id: str | None = None) -> Samples:
    """The selected samples and where they came from (all checks happen here, before any model).
    split None: a whole local file given as --dataset, else DEFAULT_SPLIT."""
    if data_source not in DATA_SOURCES:
        raise CLIError(f"unknown --data_source {data_source!r}; choose one of: {', '.join(DATA_SOURCES)}")
    spec, local_file = resolve_spec(dataset)
    split = split or ("train" if local_file else DEFAULT_SPLIT)
    parts = parse_split(split)
    names = sorted({p.name for p in parts})
    if len(names) > 1:
        raise CLIError(f"--split {split!r} mixes splits {', '.join(names)}; slice one split at a time")
    split_name = names[0]
    notes = []
    if data_source in ("auto", "local"):
        local_file = local_file or find_local_file(spec, data_dir, split_name)
        if local_file:
            rows = load_local(local_file, spec, split)
            return _select(rows, parts, split, spec, "local", f"local file {local_file} (one split; "
                           f"--split {split!r} slices it)")
        if data_source == "local":
            raise CLIError(f"no local file for {spec.name}: looked for {data_dir}/{spec.name}/{split_name}"
                           f".{{jsonl,json,parquet,arrow}} and {data_dir}/{spec.name}.{{...}}")
        notes.append(f"no local file under {data_dir}/")
    if data_source in ("auto", "hub") and spec.hub_id:
        rows, note = load_hub(spec, hub_id or spec.hub_id, split_name)
        if rows is not None:
            return _select(rows, parts, split, spec, "hub", f"{hub_id or spec.hub_id} "
                           f"(config {spec.hub_config}) via datasets, {note}")
        if data_source == "hub":
            raise CLIError(f"--data_source hub: {note}")
        notes.append(note)
    rows = load_local(SMOKE_FILE, spec, split, fields=("document", "summary"))
    why = "; ".join(notes) or "--data_source smoke"
    return _select(rows, parts, split, spec, "smoke", f"bundled smoke sample {SMOKE_FILE} ({why}): 10 "
                   f"self-written fictional news articles, NOT {spec.name}; ROUGE on it only shows the "
                   "pipeline works and is not comparable to published numbers")


def _select(rows, parts, split, spec, source, description) -> Samples:
    what = description.split(" (")[0]
    chosen = [rows[i] for i in select_rows(parts, len(rows), split, what)]
    return Samples(chosen, spec, source, description, split)
