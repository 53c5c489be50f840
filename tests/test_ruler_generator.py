"""RULER generator: length contract, answer placement, needle spans, determinism, errors."""
import collections
import json
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pyramidkv.ruler import DEFAULT_TASKS, TASKS, count_tokens, generate_sample, generate_samples
from pyramidkv.ruler import haystacks
from pyramidkv.ruler.niah import DEPTHS
from pyramidkv.ruler.spec import task_args

CHAT_TEMPLATE = "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}<|assistant|>\n"


def make_tokenizer(vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained here on the generator's own haystack text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lists = haystacks.word_lists()
    corpus = [haystacks.essay_text(), haystacks.NOISE] + [" ".join(words) for words in lists.values()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_task_lists():
    assert len(TASKS) == 13 and len(DEFAULT_TASKS) == 11
    assert "qa_1" not in DEFAULT_TASKS and "qa_2" not in DEFAULT_TASKS


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", DEFAULT_TASKS)
def test_length_contract(tokenizer, task, length):
    for sample in generate_samples(task, tokenizer, length, num_samples=2, seed=3, start_index=5):
        assert 0.95 * length <= sample["length"] <= length, (task, sample["length"])
        assert sample["length"] == count_tokens(tokenizer, sample["input"]) + sample["tokens_to_generate"]
        assert sample["input"].endswith(sample["answer_prefix"])


def _main_part(sample):
    """Text of the actual question (after vt/cwe/fwe's worked example)."""
    text = sample["input"]
    marker = {"vt": "Memorize and track", "cwe": "Below is a numbered list", "fwe": "Read the following"}
    return text[text.rindex(marker[sample["task"]]):] if sample["task"] in marker else text


@pytest.mark.parametrize("task", [t for t in DEFAULT_TASKS if t.startswith("niah")])
def test_niah_answers_and_spans(tokenizer, task):
    args = task_args(task)
    num_q = args["num_needle_q"]
    for sample in generate_samples(task, tokenizer, 2048, num_samples=3, seed=0):
        text = sample["input"]
        assert len(sample["outputs"]) == num_q * args["num_needle_v"]
        for answer in sample["outputs"]:
            assert text.count(answer) == 1  # the answer sits in its needle, nowhere else
        answers = [n for n in sample["needles"] if n["is_answer"]]
        assert sorted(n["value"] for n in answers) == sorted(sample["outputs"])
        for needle in sample["needles"]:
            assert text[slice(*needle["key_span"])] == needle["key"]
            assert text[slice(*needle["value_span"])] == needle["value"]
        queried_keys = {n["key"] for n in answers}
        assert len(queried_keys) == num_q
        distractors = [n for n in sample["needles"] if not n["is_answer"]]
        assert all(n["key"] not in queried_keys for n in distractors)
        if args["type_haystack"] == "needle":
            assert len(distractors) > 10  # the haystack itself is made of needles


def test_depths_spread_evenly(tokenizer):
    samples = generate_samples("niah_single_1", tokenizer, 1024, num_samples=40, seed=1)
    depths = [s["depth"] for s in samples]
    assert sorted(depths) == DEPTHS  # 40 consecutive samples: each grid depth once (the heatmap's rows)
    first10 = sorted(depths[:10])
    assert first10[0] == 0 and first10[-1] >= 90  # a 10-sample run reaches the whole context ...
    assert max(b - a for a, b in zip(first10, first10[1:])) <= 21  # ... without a gap over a fifth of it
    assert [s["depth"] for s in generate_samples("niah_single_1", tokenizer, 1024, 40, seed=1,
                                                 depth_order="sequential")] == DEPTHS  # older tables' order
    with pytest.raises(ValueError, match="depth_order 'middle' unknown; choose from: spread, sequential"):
        generate_samples("niah_single_1", tokenizer, 1024, 1, seed=1, depth_order="middle")
    for sample in samples:  # the needle sits at its depth within the haystack (template aside)
        start = sample["input"].index("afterwards.\n") + len("afterwards.\n")
        end = sample["input"].index("\nWhat is the special")
        where = (sample["needles"][0]["value_span"][0] - start) / (end - start)
        assert abs(where - sample["depth"] / 100) < 0.08, (sample["depth"], where)


def test_vt_chain_resolves_to_outputs(tokenizer):
    for sample in generate_samples("vt", tokenizer, 2048, num_samples=3, seed=0):
        main = _main_part(sample)
        assignments = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", main)
        value = re.search(r"assigned the value (\d+)", main).group(1)
        holders, frontier = [], {value}
        while frontier:  # follow the chain from the number through every hop
            found = [lhs for lhs, rhs in assignments if rhs.removeprefix("VAR ") in frontier]
            holders += found
            frontier = set(found)
        assert holders == sample["outputs"] and len(holders) == 5
        for name in sample["outputs"]:
            assert len(re.findall(rf"\bVAR {name} =", sample["input"])) == 1
        for needle in sample["needles"]:
            assert sample["input"][slice(*needle["value_span"])] == needle["value"]
            assert sample["input"][slice(*needle["key_span"])] == needle["key"]


@pytest.mark.parametrize("length,freq", [(2048, (6, 1)), (4096, (30, 3))])
def test_cwe_frequencies(tokenizer, length, freq):
    sample = generate_sample("cwe", tokenizer, length, index=0, seed=0)
    main = _main_part(sample)
    counts = collections.Counter(re.findall(r"\d+\. ([^\s]+)", main.split("\n")[1]))
    assert len(sample["outputs"]) == 10
    assert all(counts[w] == freq[0] for w in sample["outputs"])
    assert all(c == freq[1] for w, c in counts.items() if w not in sample["outputs"])


def test_cwe_verbose_tokenizer_drops_the_example():
    """A tokenizer that spells the numbering digit by digit cannot fit RULER's worked example at 1k;
    the sample keeps the contract with the short settings and no example."""
    verbose = make_tokenizer(vocab_size=300)
    sample = generate_sample("cwe", verbose, 1024, index=0, seed=0)
    assert sample["input"].count("Below is a numbered list") == 1
    assert 0.95 * 1024 <= sample["length"] <= 1024
    counts = collections.Counter(re.findall(r"\d+\. ([^\s]+)", sample["input"].split("\n")[1]))
    assert all(counts[w] == 6 for w in sample["outputs"]) and len(counts) > 10


def test_fwe_top_three(tokenizer):
    for sample in generate_samples("fwe", tokenizer, 4096, num_samples=2, seed=0):
        main = _main_part(sample)
        coded = main.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        counts = collections.Counter(w for w in coded if w != "...")
        ranked = [c for _, c in counts.most_common()]
        assert {w for w, _ in counts.most_common(3)} == set(sample["outputs"])
        assert ranked[2] > ranked[3]  # unambiguous top three


def test_deterministic_by_seed(tokenizer):
    a = generate_sample("niah_multikey_2", tokenizer, 1024, index=7, seed=11)
    b = generate_sample("niah_multikey_2", tokenizer, 1024, index=7, seed=11)
    c = generate_sample("niah_multikey_2", tokenizer, 1024, index=7, seed=12)
    assert a == b and a["input"] != c["input"]
    batch = generate_samples("niah_multikey_2", tokenizer, 1024, num_samples=2, seed=11, start_index=6)
    assert batch[1] == a
    assert json.loads(json.dumps(a))["outputs"] == a["outputs"]


def test_chat_template_and_small_targets(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        sample = generate_sample("niah_single_2", tokenizer, 1024, index=2, seed=0, chat_template=True)
    finally:
        tokenizer.chat_template = None
    assert sample["input"].startswith("<|user|>\n") and "<|end|>\n<|assistant|> The special" in sample["input"]
    needle = sample["needles"][0]
    assert sample["input"][slice(*needle["value_span"])] == needle["value"] == sample["outputs"][0]
    assert 0.95 * 1024 <= sample["length"] <= 1024
    for length in (256, 512):  # training sizes: below the budget, answer still present once
        short = generate_sample("niah_single_1", tokenizer, length, index=0, seed=0, tokens_to_generate=16)
        assert short["length"] <= length and short["input"].count(short["outputs"][0]) == 1
        assert short["length"] >= 0.9 * length


def test_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'.*niah_single_1"):
        generate_sample("niah_single_9", tokenizer, 1024, 0, 0)
    with pytest.raises(ValueError, match="chat template"):
        generate_sample("niah_single_1", tokenizer, 1024, 0, 0, chat_template=True)
    with pytest.raises(ValueError, match="too small"):
        generate_sample("cwe", tokenizer, 512, 0, 0)
    with pytest.raises(ValueError, match="haystack_override 'lava'"):
        generate_sample("niah_single_1", tokenizer, 1024, 0, 0, haystack_override="lava")
    with pytest.raises(FileNotFoundError, match="SQuAD v2.0 dev set.*squad.json"):
        generate_sample("qa_1", tokenizer, 1024, 0, 0, qa_dir=str(tmp_path))


def test_qa_from_placed_file(tokenizer, tmp_path):
    paragraphs = [{"context": f"Paragraph {i} says the river {i} flows north into lake {i}.",
                   "qas": [{"question": f"Where does river {i} flow?", "is_impossible": False,
                            "answers": [{"text": f"lake {i}"}]}]} for i in range(400)]
    (tmp_path / "squad.json").write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}))
    sample = generate_sample("qa_1", tokenizer, 1024, index=3, seed=0, qa_dir=str(tmp_path))
    assert sample["outputs"] == ["lake 3"] and "Where does river 3 flow?" in sample["input"]
    assert "Paragraph 3 says" in sample["input"] and 0.95 * 1024 <= sample["length"] <= 1024
