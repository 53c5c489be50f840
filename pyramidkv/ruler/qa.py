"""RULER qa_1 (SQuAD v2.0 dev) and qa_2 (HotpotQA dev, distractor setting).

The question's gold paragraph(s) are mixed with other paragraphs of the dataset until the budget is
filled (Hsieh et al., 2024, Sec. 3.4). The dataset files are not redistributable here and the hub is
not used: the user places them in data/ (or passes qa_dir).
"""
from __future__ import annotations

import functools
import json
import os
from random import Random

from .fitting import Built
from .spec import task_args, task_template

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QA_FILES = {
    "squad": (("squad.json", "dev-v2.0.json"), "SQuAD v2.0 dev set",
              "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json"),
    "hotpotqa": (("hotpotqa.json", "hotpot_dev_distractor_v1.json"), "HotpotQA dev (distractor) set",
                 "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json"),
}


def find_qa_file(dataset: str, qa_dir: str | None = None) -> str:
    names, title, url = QA_FILES[dataset]
    dirs = [qa_dir] if qa_dir else [os.path.join(os.getcwd(), "data"), os.path.join(REPO_ROOT, "data")]
    for directory in dirs:
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"RULER qa needs the {title}: download {url} and save it as "
                            f"{os.path.join(dirs[0], names[0])} (or {names[1]} in the same folder)")


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:  # the text reader's offsets are per chunk: find the byte in the whole file
        with open(path, "rb") as f:
            data = f.read()
        start = _first_bad_byte(data)
        line = data.count(b"\n", 0, start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[start]:#04x})") from None


def _first_bad_byte(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return 0


@functools.lru_cache(maxsize=4)
def read_squad(path: str) -> tuple[list[dict], list[str]]:
    """Answerable questions with the index of their paragraph and of same-article paragraphs."""
    data = _load_json(path)
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        doc_id = {c: i for i, c in enumerate(docs)}
        questions = []
        for article in data["data"]:
            article_docs = [doc_id[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                gold = doc_id[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if qa.get("is_impossible"):
                        continue
                    questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                      "context": [gold], "more_context": [i for i in article_docs if i != gold]})
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a SQuAD v2.0 file (missing field {err})") from None
    return questions, docs


@functools.lru_cache(maxsize=4)
def read_hotpotqa(path: str) -> tuple[list[dict], list[str]]:
    data = _load_json(path)
    try:
        docs = sorted({f"{title}\n{''.join(sents)}" for d in data for title, sents in d["context"]})
        doc_id = {c: i for i, c in enumerate(docs)}
        questions = [{"query": d["question"], "outputs": [d["answer"]],
                      "context": [doc_id[f"{t}\n{''.join(s)}"] for t, s in d["context"]], "more_context": []}
                     for d in data]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a HotpotQA dev file ({err})") from None
    return questions, docs


def make_builder(task: str, sample_seed: int, index: int, ctx: dict):
    dataset = task_args(task)["dataset"]
    path = find_qa_file(dataset, ctx.get("qa_dir"))
    questions, docs = (read_squad if dataset == "squad" else read_hotpotqa)(path)
    question = questions[index % len(questions)]
    gold, more = question["context"], question["more_context"]
    rng = Random(sample_seed)
    rest = [i for i in range(len(docs)) if i not in set(gold) | set(more)]
    rng.shuffle(rest)
    order = gold + more + rest  # grow from same-article paragraphs to random others, as RULER
    spec = task_template(task)
    pre, post = spec["template"].split("{context}")
    post = post.format(query=question["query"])

    def build(n: int) -> Built:
        chosen = [docs[i] for i in order[:n]]
        Random(sample_seed + n).shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(chosen))
        return Built(pre + context + post, spec["answer_prefix"], list(question["outputs"]), [], None)

    return build, len(gold)
