"""LongBench / RULER metrics against values worked out by hand from the official definitions."""
import pytest

from pyramidkv import metrics as M


# ---------------------------------------------------------------- qa_f1
@pytest.mark.parametrize("pred, truth, expected", [
    ("The Eiffel Tower!", "eiffel tower", 1.0),              # case, punctuation, article
    ("a cat sat on the mat", "the cat on a mat", 6 / 7),     # P=3/4, R=1 -> 2*.75/1.75
    ("paris paris", "paris", 2 / 3),                         # multiset overlap: 1 common, P=1/2
    ("U.S.A.", "USA", 1.0),                                  # punctuation removed inside words
    ("another", "another answer", 2 / 3),                    # "an" only dropped as a whole word
    ("", "paris", 0.0),                                      # empty prediction
    ("the", "the", 0.0),                                     # only articles -> no tokens -> 0
    ("London", "Paris", 0.0),
])
def test_qa_f1(pred, truth, expected):
    assert M.qa_f1(pred, truth) == pytest.approx(expected)


def test_normalize_answer_order():
    # punctuation goes before article removal, so "the," still loses "the"
    assert M.normalize_answer("The, BIG  dog.") == "big dog"


# ---------------------------------------------------------------- qa_f1_zh
def test_qa_f1_zh():
    import jieba
    assert list(jieba.cut("我爱北京")) == ["我", "爱", "北京"]  # premise of the hand computation
    assert M.qa_f1_zh("我爱北京", "北京") == pytest.approx(0.5)  # 1 common of 3 predicted: P=1/3, R=1
    assert M.qa_f1_zh("北京。", "北京") == pytest.approx(1.0)   # Chinese full stop token dropped
    assert M.qa_f1_zh("", "北京") == 0.0


# ---------------------------------------------------------------- rouge (PyPI rouge 1.0.1, ROUGE-L F)
def test_rouge_l_f():
    # LCS 3 of 3 predicted / 6 distinct reference words: P=1, R=1/2 -> F=2/3
    assert M.rouge("the cat sat", "the cat sat on a mat") == pytest.approx(2 / 3, abs=1e-6)
    # equal lengths, LCS "cat sat" or "cat mat" = 2: P=R=F=2/3
    assert M.rouge("cat sat mat", "cat mat sat") == pytest.approx(2 / 3, abs=1e-6)
    # rouge 1.0.1 counts distinct words (5 in the reference): R=3/5, P=1 -> F=0.75
    assert M.rouge("the cat sat", "the cat sat on the mat") == pytest.approx(0.75, abs=1e-6)


def test_rouge_edge_cases():
    assert M.rouge("", "a summary") == 0.0      # library raises "Hypothesis is empty" -> 0
    assert M.rouge(".", "a summary") == 0.0     # only punctuation is empty too
    assert M.rouge("The Cat", "the cat") == 0.0  # rouge 1.0.1 is case sensitive


def test_rouge_zh_joins_jieba_tokens():
    # "我爱北京" -> 我 爱 北京 (3 words); "北京" -> 1 word; LCS 1: P=1/3, R=1 -> F=0.5
    assert M.rouge_zh("我爱北京", "北京") == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- classification
CLASSES = ["Location", "Number", "Description", "Entity"]


def test_classification():
    assert M.classification("Location", "Location", all_classes=CLASSES) == 1.0
    assert M.classification("Number or Location", "Location", all_classes=CLASSES) == 0.5
    assert M.classification("Entity", "Location", all_classes=CLASSES) == 0.0
    assert M.classification("", "Location", all_classes=CLASSES) == 0.0


def test_classification_upstream_quirk():
    # matches ["a", "b", "ab"]: "a" (substring of truth) is removed, which skips "b", so "b" stays:
    # 1/len(["b", "ab"]) = 0.5 (a clean filter would give 1.0).
    assert M.classification("ab", "ab", all_classes=["a", "b", "ab"]) == 0.5
    # without a skipped neighbour the sub-class is removed as intended: ["a", "ab"] -> ["ab"]
    assert M.classification("ab", "ab", all_classes=["a", "ab"]) == 1.0


# ---------------------------------------------------------------- retrieval / count
def test_retrieval():
    assert M.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval("Paragraph 3 or Paragraph 13", "Paragraph 3") == 0.5
    assert M.retrieval("Paragraph 30", "Paragraph 3") == 0.0
    assert M.retrieval("I do not know", "Paragraph 3") == 0.0  # no numbers at all
    assert M.retrieval_zh("段落5", "段落5") == 1.0
    assert M.retrieval_zh("段落5和段落7", "段落5") == 0.5


def test_count():
    assert M.count("There are 12 unique paragraphs, not 21", "12") == 0.5
    assert M.count("12", "12") == 1.0
    assert M.count("twelve", "12") == 0.0


# ---------------------------------------------------------------- code_sim (difflib backend)
def test_code_sim():
    assert M.code_sim("\n# comment\n    return a + b\n", "    return a + b") == 1.0  # skip comment line
    assert M.code_sim("```python", "x = 1") == 0.0   # no code line -> "" -> ratio 0
    assert M.code_sim("abcde", "abxde") == 0.8        # 2*4 matched / 10 chars
    assert M.code_sim("abc", "abd") == 0.67           # 2*2/6 = 66.7 -> rounded to 67 by fuzzywuzzy
    assert M.code_sim("// js comment\nabc", "abc") == 1.0


# ---------------------------------------------------------------- dataset scoring
def test_first_line_rule_and_max_over_answers():
    # trec: only the first line after leading newlines is scored
    assert M.score_sample("trec", "\nLocation\nNumber", ["Location"], CLASSES) == 1.0
    assert M.score_sample("trec", "Number\nLocation", ["Location"], CLASSES) == 0.0
    # not a first-line dataset: the whole prediction counts (qa_f1 over "paris france" vs "paris")
    assert M.score_sample("hotpotqa", "Paris\nFrance", ["Paris"]) == pytest.approx(2 / 3)
    # several answers: the best one counts
    assert M.score_sample("triviaqa", "Big Apple", ["New York City", "big apple"]) == 1.0


def test_longbench_score_rounding():
    # per-sample 1, 2/3, 0 -> mean 5/9 -> 55.56
    preds = ["paris", "paris paris", "rome"]
    assert M.longbench_score("hotpotqa", preds, [["paris"]] * 3) == 55.56


def test_unknown_dataset_is_one_line_error():
    with pytest.raises(ValueError, match="unknown LongBench dataset 'nope'"):
        M.score_sample("nope", "x", ["x"])


def test_longbench_e_buckets():
    preds = ["paris", "rome", "paris", "paris"]
    scores = M.longbench_e_scores("hotpotqa", preds, [["paris"]] * 4, [3999, 4000, 7999, 8000])
    assert scores == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 100.0}
    assert M.longbench_e_scores("hotpotqa", ["x"], [["x"]], [10])["8k+"] is None  # empty bucket


# ---------------------------------------------------------------- RULER
def test_string_match_all():
    preds = ["The numbers are 123 and 456", "none"]
    refs = [["123", "456", "789"], ["x"]]
    assert M.string_match_all(preds, refs) == 33.33  # (2/3 + 0) / 2
    assert M.string_match_all(["ABC"], [["abc"]]) == 100.0  # case-insensitive


def test_string_match_part():
    assert M.string_match_part(["Answer: PARIS", "london"], [["paris", "France"], ["rome"]]) == 50.0
    assert M.string_match_part(["France"], [["paris", "France"]]) == 100.0


def test_ruler_postprocess():
    assert M.ruler_postprocess("  42\x00tail \n") == "42\ntail"
