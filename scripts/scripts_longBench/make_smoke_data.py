"""Write data/longbench_smoke/: a tiny sample in LongBench jsonl format — NOT LongBench.

Every text is generated here from sentences written for this project (a fictional world of towns,
people and rivers; small self-written Python files), so the data is the project's own. It exists only
so that `scripts/scripts_longBench/eval.sh` runs end to end where the real LongBench cannot be
downloaded; its scores say nothing about LongBench. Deterministic: rerunning rewrites identical files.

    python scripts/scripts_longBench/make_smoke_data.py [--out data/longbench_smoke] [--per_dataset 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random

NAMES = ["Alma Reed", "Bruno Okafor", "Clara Voss", "Dmitri Hale", "Edda Lind", "Felix Marsh",
         "Greta Nunez", "Hugo Pratt", "Ines Calder", "Jonas Weir", "Kira Thorne", "Luca Benn"]
TOWNS = ["Arlen", "Bexford", "Corrin", "Dunmere", "Elwick", "Farrow", "Glenholt", "Hastwell",
         "Ivybridge Cross", "Jorvale", "Kestermoor", "Lanford"]
RIVERS = ["Mora", "Tessel", "Kell", "Varn", "Osk", "Lidden", "Pell", "Sarrow"]
OBJECTS = ["a blue lantern", "a copper kettle", "an oak chest", "a torn map", "a brass compass",
           "a wool blanket", "a clay jar", "a silver whistle"]
TRADES = ["baker", "ferryman", "clockmaker", "weaver", "schoolteacher", "blacksmith", "miller", "glazier"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
FILLER = [
    "{town} has a small market that opens every {day} before sunrise.",
    "The road from {town} to {town2} crosses the river {river} on a stone bridge.",
    "In spring the fields around {town} turn yellow with mustard flowers.",
    "{name} spent one long winter repairing the roof of the old granary.",
    "Most houses in {town} are built of grey stone cut from the nearby hills.",
    "The {trade} of {town} keeps a ledger of every order taken since the flood.",
    "Children in {town2} learn to swim in the shallow bends of the {river}.",
    "A bell rings in {town} at noon, and the shops close for an hour.",
    "Travellers say the inn at {town2} serves the best barley soup in the valley.",
    "{name} once walked from {town} to {town2} in a single day without resting.",
    "Fog often covers the {river} in autumn, so the ferry waits until midday.",
    "The library of {town} holds letters written by the first settlers.",
]


def sentence(rng: random.Random) -> str:
    return rng.choice(FILLER).format(town=rng.choice(TOWNS), town2=rng.choice(TOWNS), day=rng.choice(DAYS),
                                     river=rng.choice(RIVERS), name=rng.choice(NAMES),
                                     trade=rng.choice(TRADES))


def filler(rng: random.Random, n: int) -> str:
    return " ".join(sentence(rng) for _ in range(n))


def with_fact(rng: random.Random, fact: str, n: int) -> str:
    """n filler sentences with the fact hidden at a random position."""
    parts = [sentence(rng) for _ in range(n)]
    parts.insert(rng.randrange(n + 1), fact)
    return " ".join(parts)


def sample(dataset: str, i: int, context: str, question: str, answers: list, classes=None,
           language: str = "en") -> dict:
    length = len(context) if language == "zh" else len(context.split())  # LongBench: chars for zh
    uid = hashlib.sha256(f"smoke/{dataset}/{i}".encode()).hexdigest()[:24]
    return {"input": question, "context": context, "answers": answers, "length": length,
            "dataset": dataset, "language": language, "all_classes": classes, "_id": uid}


# ----------------------------------------------------------------------------- English QA and summaries

def single_doc_qa(dataset: str, rng: random.Random, i: int) -> dict:
    name, obj, town = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(TOWNS)
    fact = f"On the morning of the fair, {name} carried {obj} to the market of {town}."
    context = with_fact(rng, fact, 40 + 20 * i)
    return sample(dataset, i, context, f"What did {name} carry to the market of {town}?", [obj])


def multi_hop_qa(dataset: str, rng: random.Random, i: int) -> dict:
    name, town, river = rng.choice(NAMES), rng.choice(TOWNS), rng.choice(RIVERS)
    passages = [f"{rng.choice(TOWNS)}\n{filler(rng, 6)}" for _ in range(4 + 2 * i)]
    passages.insert(rng.randrange(len(passages)), f"{name}\n{name} was born in {town} and became a "
                                                  f"{rng.choice(TRADES)} there.")
    passages.insert(rng.randrange(len(passages)), f"{town}\n{town} is a village on the river {river}.")
    context = "\n".join(f"Passage {k + 1}:\n{p}" for k, p in enumerate(passages))
    return sample(dataset, i, context, f"On which river is the birthplace of {name}?", [river])


def report(dataset: str, rng: random.Random, i: int) -> dict:
    town, river = rng.choice(TOWNS), rng.choice(RIVERS)
    bridges = 2 + i
    summary = (f"The council of {town} reviewed its {bridges} bridges over the {river}, found two in poor "
               f"repair and asked for funds to rebuild them within three years.")
    sections = [f"Section {k + 1}. {filler(rng, 8)}" for k in range(4 + i)]
    sections.insert(1, f"The council of {town} inspected all {bridges} bridges over the {river}. Two of "
                       "them were in poor repair, and the council asks for funds to rebuild them within "
                       "three years.")
    return sample(dataset, i, "\n\n".join(sections), "", [summary])


def meeting(dataset: str, rng: random.Random, i: int) -> dict:
    speakers = rng.sample(NAMES, 3)
    day = rng.choice(DAYS)
    turns = [f"{rng.choice(speakers)}: {sentence(rng)}" for _ in range(30 + 10 * i)]
    turns.insert(rng.randrange(len(turns)), f"{speakers[0]}: We agree to move the market to {day}.")
    query = "What did the group decide about the market?"
    return sample(dataset, i, "\n".join(turns), query, [f"They decided to move the market to {day}."])


def news(dataset: str, rng: random.Random, i: int) -> dict:
    town, river = rng.choice(TOWNS), rng.choice(RIVERS)
    lead = f"Heavy rain raised the {river} and flooded the lower streets of {town}."
    passages = [f"{lead} {filler(rng, 10)}", f"Volunteers in {town} filled sandbags. {filler(rng, 10 + 3 * i)}"]
    context = "\n\n".join(f"Passage {k + 1}:\n{p}" for k, p in enumerate(passages))
    summary = f"The {river} flooded the lower streets of {town} and volunteers filled sandbags."
    return sample(dataset, i, context, "", [summary])


# ----------------------------------------------------------------------------- few-shot sets

TREC_CLASSES = ["Location", "Person", "Number", "Date", "Description", "Entity"]
TREC_QUESTIONS = [
    ("Where does the ferry on the {river} land?", "Location"),
    ("Who repaired the granary roof in {town}?", "Person"),
    ("How many bridges cross the {river}?", "Number"),
    ("When does the market of {town} open?", "Date"),
    ("Why does fog cover the {river} in autumn?", "Description"),
    ("What soup does the inn at {town} serve?", "Entity"),
]


def trec(dataset: str, rng: random.Random, i: int) -> dict:
    def question():
        text, label = rng.choice(TREC_QUESTIONS)
        return text.format(river=rng.choice(RIVERS), town=rng.choice(TOWNS)), label
    shots = [question() for _ in range(25 + 10 * i)]
    context = "\n".join(f"Question: {q}\nType: {label}" for q, label in shots)
    q, label = question()
    return sample(dataset, i, context, f"Question: {q}\nType:", [label], classes=TREC_CLASSES)


def triviaqa(dataset: str, rng: random.Random, i: int) -> dict:
    def shot():
        name, town = rng.choice(NAMES), rng.choice(TOWNS)
        passage = with_fact(rng, f"{name} works as the {rng.choice(TRADES)} of {town}.", 4)
        return passage, f"In which town does {name} work?", town
    shots = [shot() for _ in range(6 + 3 * i)]
    context = "\n\n".join(f"Passage: {p}\nQuestion: {q}\nAnswer: {a}" for p, q, a in shots)
    p, q, a = shot()
    return sample(dataset, i, context, f"Passage: {p}\nQuestion: {q}\nAnswer:", [a])


def samsum(dataset: str, rng: random.Random, i: int) -> dict:
    def shot():
        a, b = rng.sample(NAMES, 2)
        obj, town = rng.choice(OBJECTS), rng.choice(TOWNS)
        dialogue = (f"{a.split()[0]}: Did you see {obj} anywhere?\n{b.split()[0]}: I left it in {town}.\n"
                    f"{a.split()[0]}: Please bring it back tomorrow.\n{b.split()[0]}: I will.")
        return dialogue, f"{b.split()[0]} left {obj} in {town} and will bring it back tomorrow."
    shots = [shot() for _ in range(10 + 5 * i)]
    context = "\n\n".join(f"Dialogue: {d}\nSummary: {s}" for d, s in shots)
    d, s = shot()
    return sample(dataset, i, context, f"Dialogue: {d}\nSummary: ", [s])


# ----------------------------------------------------------------------------- synthetic sets

def paragraphs(rng: random.Random, n: int, sentences: int = 3) -> list[str]:
    return [filler(rng, sentences) for _ in range(n)]


def passage_count(dataset: str, rng: random.Random, i: int) -> dict:
    unique = paragraphs(rng, 6 + 2 * i)
    shown = unique + rng.sample(unique, 3)
    rng.shuffle(shown)
    context = "\n\n".join(f"Paragraph {k + 1}: {p}" for k, p in enumerate(shown))
    return sample(dataset, i, context, "", [str(len(set(shown)))])


def passage_retrieval(dataset: str, rng: random.Random, i: int) -> dict:
    # each paragraph opens with its own count of boats, so exactly one paragraph fits the abstract
    boats = rng.sample(range(10, 99), 30)
    paras = [f"{rng.choice(NAMES)} counted {n} boats on the {rng.choice(RIVERS)}. {filler(rng, 2 + i % 2)}"
             for n in boats]
    target = rng.randrange(30)
    abstract = f"A count of {boats[target]} boats on a river, followed by notes about the valley."
    context = "\n\n".join(f"Paragraph {k + 1}: {p}" for k, p in enumerate(paras))
    return sample(dataset, i, context, abstract, [f"Paragraph {target + 1}"])


CODE_FILE = '''import math


class Ledger:
    """Orders kept by a {trade} of {town}."""

    def __init__(self, owner):
        self.owner = owner
        self.orders = []

    def add(self, item, price):
        if price < 0:
            raise ValueError("price must be positive")
        self.orders.append((item, price))
        return len(self.orders)

    def total(self):
        return sum(price for _, price in self.orders)

    def average(self):
        if not self.orders:
            return 0.0
        return self.total() / len(self.orders)

    def rounded_total(self, step):
        return math.ceil(self.total() / step) * step


def crossing_time(width, speed):
    return width / speed


def summary(ledger):
    lines = [f"owner: {{ledger.owner}}"]
    for item, price in ledger.orders:
        lines.append(f"{{item}}: {{price:.2f}}")
    lines.append(f"total: {{ledger.total():.2f}}")
    return "\\n".join(lines)
'''


def code_lines(rng: random.Random) -> list[str]:
    return CODE_FILE.format(trade=rng.choice(TRADES), town=rng.choice(TOWNS)).split("\n")


def lcc(dataset: str, rng: random.Random, i: int) -> dict:
    lines = code_lines(rng)
    cut = [k for k, line in enumerate(lines) if line.strip() and k > 10][3 + 5 * i]
    return sample(dataset, i, "\n".join(lines[:cut]) + "\n", "", [lines[cut]])


def repobench(dataset: str, rng: random.Random, i: int) -> dict:
    helper = "\n".join(code_lines(rng)[:20])
    context = f"# Path: ledger/core.py\n{helper}\n\n# Path: ledger/util.py\ndef clamp(x, lo, hi):\n" \
              "    return max(lo, min(hi, x))\n"
    current = ["# Path: ledger/report.py", "from ledger.core import Ledger", "from ledger.util import clamp",
               "", "def build(owner, items):", "    ledger = Ledger(owner)", "    for item, price in items:",
               "        ledger.add(item, clamp(price, 0, 100))", "    return ledger"]
    cut = 5 + i
    return sample(dataset, i, context, "\n".join(current[:cut]) + "\n", [current[cut]])


# ----------------------------------------------------------------------------- Chinese sets (self-written)

ZH_FILLER = ["河边的小镇每到周末都很热闹。", "老师傅每天清晨都会打扫院子。", "秋天的时候，山上的树叶变成了红色。",
             "村里的图书馆收藏了很多旧信件。", "孩子们放学后在广场上踢球。", "雨季来临前，农民们忙着修补屋顶。",
             "集市上卖的苹果又大又甜。", "渡船每天往返两岸三次。"]
ZH_TOWNS = ["青石镇", "柳河村", "白沙镇", "松林村"]


def zh_filler(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ZH_FILLER) for _ in range(n))


def zh_qa(dataset: str, rng: random.Random, i: int) -> dict:
    town, year = rng.choice(ZH_TOWNS), 1900 + rng.randrange(100)
    fact = f"{town}的石桥建于{year}年。"
    context = zh_filler(rng, 15 + 5 * i) + fact + zh_filler(rng, 15)
    return sample(dataset, i, context, f"{town}的石桥建于哪一年？", [f"{year}年"], language="zh")


def zh_summary(dataset: str, rng: random.Random, i: int) -> dict:
    town = rng.choice(ZH_TOWNS)
    turns = [f"发言人{k % 3 + 1}：{rng.choice(ZH_FILLER)}" for k in range(20 + 5 * i)]
    turns.insert(5, f"发言人1：我们决定明年在{town}修一座新的码头。")
    return sample(dataset, i, "\n".join(turns), "", [f"会议决定明年在{town}修建新码头。"], language="zh")


LSHT_CLASSES = ["体育", "财经", "科技", "教育"]
LSHT_NEWS = {"体育": "镇上的足球队赢得了比赛。", "财经": "集市上的粮食价格今年上涨了。",
             "科技": "工程师为渡船安装了新的发动机。", "教育": "村里的小学新来了三位老师。"}


def lsht(dataset: str, rng: random.Random, i: int) -> dict:
    shots = [rng.choice(LSHT_CLASSES) for _ in range(12 + 4 * i)]
    context = "\n".join(f"新闻：{LSHT_NEWS[c]}{rng.choice(ZH_FILLER)}\n类别：{c}" for c in shots)
    label = rng.choice(LSHT_CLASSES)
    return sample(dataset, i, context, f"新闻：{LSHT_NEWS[label]}\n类别：", [label], classes=LSHT_CLASSES,
                  language="zh")


def zh_retrieval(dataset: str, rng: random.Random, i: int) -> dict:
    houses = rng.sample(range(20, 99), 12)  # a distinct number per paragraph makes the target unique
    paras = [f"{rng.choice(ZH_TOWNS)}有{n}户人家。{zh_filler(rng, 3)}" for n in houses]
    target = rng.randrange(len(paras))
    context = "\n\n".join(f"段落{k + 1}：{p}" for k, p in enumerate(paras))
    return sample(dataset, i, context, f"这一段说一个村镇有{houses[target]}户人家。", [f"段落{target + 1}"],
                  language="zh")


BUILDERS = {
    "narrativeqa": single_doc_qa, "qasper": single_doc_qa, "multifieldqa_en": single_doc_qa,
    "hotpotqa": multi_hop_qa, "2wikimqa": multi_hop_qa, "musique": multi_hop_qa,
    "gov_report": report, "qmsum": meeting, "multi_news": news,
    "trec": trec, "triviaqa": triviaqa, "samsum": samsum,
    "passage_count": passage_count, "passage_retrieval_en": passage_retrieval,
    "lcc": lcc, "repobench-p": repobench,
    "multifieldqa_zh": zh_qa, "dureader": zh_qa, "vcsum": zh_summary, "lsht": lsht,
    "passage_retrieval_zh": zh_retrieval,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--out", default=os.path.join(root, "data", "longbench_smoke"))
    parser.add_argument("--per_dataset", type=int, default=2,
                        help="samples per dataset (summary sets with 512 new tokens always get 1)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(root, "pyramidkv", "reference", "longbench", "dataset2maxlen.json")) as f:
        max_new_tokens = json.load(f)
    for dataset, build in BUILDERS.items():
        rng = random.Random(f"smoke/{dataset}")  # str seeds are stable across runs and platforms
        # summaries generate up to 512 tokens each: one sample keeps a CPU run of all sets short
        count = 1 if max_new_tokens[dataset] >= 512 else args.per_dataset
        with open(os.path.join(args.out, f"{dataset}.jsonl"), "w", encoding="utf-8") as f:
            for i in range(count):
                f.write(json.dumps(build(dataset, rng, i), ensure_ascii=False) + "\n")
    print(f"wrote {len(BUILDERS)} files to {args.out} ({args.per_dataset} samples each, 1 for 512-token "
          "summary sets)")


if __name__ == "__main__":
    main()
