"""Official LongBench v1 and RULER metrics, reimplemented from their definitions.

LongBench: Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding"
(ACL 2024, arXiv:2308.14508). RULER: Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?" (COLM 2024, arXiv:2404.06654).

Every per-sample metric takes (prediction, ground_truth, all_classes=None) and returns a float in
[0, 1]. Dataset scores are round(100 * mean of per-sample max over answers, 2), as upstream.
"""
from __future__ import annotations

import re
import string
import warnings
from collections import Counter

# Chinese punctuation removed by qa_f1_zh (upstream list; the ASCII set is added on top).
_ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗"
                   "〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ASCII_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = _ASCII_PUNCTUATION | set(_ZH_PUNCTUATION)


# ----------------------------------------------------------------------------- normalisation

def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, drop ASCII punctuation, drop articles a/an/the, squash whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese variant: lowercase, drop ASCII + Chinese punctuation, remove all whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ALL_PUNCTUATION)
    return "".join(text.split())


def _jieba_tokens(text: str) -> list[str]:
    import jieba
    return list(jieba.cut(text, cut_all=False))


# ----------------------------------------------------------------------------- LongBench metrics

def token_f1(prediction_tokens: list[str], ground_truth_tokens: list[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, all_classes=None) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    def tokens(text):
        normalized = (normalize_zh_answer(t) for t in _jieba_tokens(text))
        return [t for t in normalized if t]
    return token_f1(tokens(prediction), tokens(ground_truth))


def rouge(prediction: str, ground_truth: str, all_classes=None) -> float:
    """ROUGE-L F from PyPI `rouge` 1.0.1; any exception (e.g. an empty prediction) scores 0."""
    from rouge import Rouge
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # upstream catches everything: empty hypothesis, recursion on huge inputs, ...
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    return rouge(" ".join(_jieba_tokens(prediction)), " ".join(_jieba_tokens(ground_truth)))


def classification(prediction: str, ground_truth: str, all_classes=None) -> float:
    """1/len(matches) when the true class is among the class names found in the prediction.

    Class names that are substrings of the truth (but not the truth) are dropped, with the upstream
    quirk kept on purpose: the list is mutated while it is iterated, so the element right after a
    removed one is never examined (truth "ab", matches ["a", "b", "ab"] keeps "b": score 1/2).
    """
    matches = [name for name in (all_classes or []) if name in prediction]
    for term in matches:  # mutation during iteration is the official behaviour being reproduced
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_equal_numbers(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == str(target)) / len(numbers)


def retrieval(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Share of the numbers in the prediction equal to the paragraph id of 'Paragraph N'."""
    return _share_equal_numbers(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh(prediction: str, ground_truth: str, all_classes=None) -> float:
    return _share_equal_numbers(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Share of the numbers in the prediction equal to the true count."""
    return _share_equal_numbers(prediction, ground_truth)


def code_sim(prediction: str, ground_truth: str, all_classes=None) -> float:
    """fuzzywuzzy ratio (difflib backend) between the first code line and the reference line.

    The first line (after leading newlines) containing none of ` # // is compared; none -> "".
    """
    with warnings.catch_warnings():  # the difflib backend is the official one: no need to warn
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzz.ratio(first_code_line, ground_truth) / 100


DATASET_TO_METRIC = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1, "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_zh,
    "gov_report": rouge, "qmsum": rouge, "multi_news": rouge, "vcsum": rouge_zh,
    "trec": classification, "triviaqa": qa_f1, "samsum": rouge, "lsht": classification,
    "passage_retrieval_en": retrieval, "passage_count": count, "passage_retrieval_zh": retrieval_zh,
    "lcc": code_sim, "repobench-p": code_sim,
}
# Few-shot datasets whose models keep talking after the answer: only the first line is scored.
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")
LONGBENCH_E_BUCKETS = ("0-4k", "4-8k", "8k+")


def score_sample(dataset: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """Per-sample LongBench score in [0, 1]: the dataset's metric, max over the reference answers."""
    if dataset not in DATASET_TO_METRIC:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; known: {', '.join(DATASET_TO_METRIC)}")
    metric = DATASET_TO_METRIC[dataset]
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max([0.0] + [metric(prediction, truth, all_classes=all_classes) for truth in answers])


def longbench_score(dataset: str, predictions: list[str], answers: list[list[str]],
                    all_classes: list | None = None) -> float:
    """Dataset score: round(100 * mean per-sample score, 2). all_classes: one list per sample or None."""
    if not predictions:
        raise ValueError(f"no predictions to score for {dataset!r}")
    classes = all_classes if all_classes is not None else [None] * len(predictions)
    total = sum(score_sample(dataset, p, a, c) for p, a, c in zip(predictions, answers, classes))
    return round(100 * total / len(predictions), 2)


def length_bucket(length: int) -> str:
    """LongBench-E bucket of a sample by its `length` field (words/characters, as in the data)."""
    if length < 4000:
        return "0-4k"
    return "4-8k" if length < 8000 else "8k+"


def longbench_e_scores(dataset: str, predictions: list[str], answers: list[list[str]], lengths: list[int],
                       all_classes: list | None = None) -> dict:
    """Per-bucket scores {"0-4k": s, "4-8k": s, "8k+": s}; an empty bucket is None (upstream: NaN)."""
    classes = all_classes if all_classes is not None else [None] * len(predictions)
    buckets = {name: [] for name in LONGBENCH_E_BUCKETS}
    for p, a, n, c in zip(predictions, answers, lengths, classes):
        buckets[length_bucket(n)].append(score_sample(dataset, p, a, c))
    return {name: (round(100 * sum(s) / len(s), 2) if s else None) for name, s in buckets.items()}


# ----------------------------------------------------------------------------- RULER metrics

def ruler_postprocess(prediction: str) -> str:
    """RULER's cleanup before matching: control characters become newlines, outer space stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of the fraction of references found (case-insensitive) in the prediction."""
    if not predictions:
        raise ValueError("no predictions to score")
    total = 0.0
    for pred, refs in zip(predictions, references):
        pred = pred.lower()
        total += sum(1.0 for r in refs if r.lower() in pred) / len(refs)
    return round(100 * total / len(predictions), 2)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over samples of 1 when any reference is found (case-insensitive) in the prediction."""
    if not predictions:
        raise ValueError("no predictions to score")
    total = 0.0
    for pred, refs in zip(predictions, references):
        pred = pred.lower()
        total += max(1.0 if r.lower() in pred else 0.0 for r in refs)
    return round(100 * total / len(predictions), 2)


def leading_digits(prediction: str, value: str) -> int:
    """How many leading digits of a numeric needle value the answer reproduces: the digits of the
    answer before its first "." compared with the value from the left (the needle diagnosis' measure:
    SnapKV's kernel-7 answers reproduce exactly 4 of 7 digits on SmolLM2)."""
    digits = "".join(ch for ch in prediction.split(".")[0] if ch.isdigit())
    return next((i for i, (a, b) in enumerate(zip(digits, value)) if a != b), min(len(digits), len(value)))


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def leading_uuid_chars(prediction: str, value: str) -> int:
    """How many leading characters (hyphens included, 36 = all) of a UUID needle value the answer
    reproduces: its first run of at least 4 hex digits and hyphens that holds a digit or a hyphen
    (so that words such as "added" are not taken for it), compared with the value from the left."""
    run = next((m.group(0) for m in re.finditer(r"[0-9a-f][0-9a-f-]{3,}", prediction.lower())
                if re.search(r"[0-9-]", m.group(0))), "")
    return next((i for i, (a, b) in enumerate(zip(run, value)) if a != b), min(len(run), len(value)))


RULER_TASK_TO_METRIC = {
    **{t: string_match_all for t in ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                     "niah_multikey_2", "niah_multikey_3", "niah_multivalue",
                                     "niah_multiquery", "vt", "cwe", "fwe")},
    "qa_1": string_match_part, "qa_2": string_match_part,
}
