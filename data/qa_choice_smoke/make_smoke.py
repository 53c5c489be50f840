"""Writes choices.jsonl: 12 self-written multiple-choice questions on fictional passages, in the
lm-eval-harness style (context, choices, gold). NOT openbookqa, piqa, copa, winogrande or mathqa.

Each context is a short passage followed by a question; the answer is stated once in the passage, so
the question is answerable from the context alone and compression can lose it.
Run: python data/qa_choice_smoke/make_smoke.py
"""
import json
import os

QUESTIONS = [
    ("The village of Harrowmere sits on the river Osk. Its market opens every Friday before sunrise, and "
     "the baker Ada Penrose sells barley bread there. The old footbridge was built of grey stone in 1871.",
     "What was the old footbridge built of?", ["grey stone", "red brick", "oak timber", "cast iron"], 0),
    ("Dr. Mirela Stanescu grew a winter wheat that needs a quarter less water. She crossed bread wheat "
     "with a wild grass collected on dry hillsides. Field trials ran for three seasons in two regions.",
     "How many seasons did the field trials run?", ["one", "two", "three", "five"], 2),
    ("The Eastvale Rovers play basketball in a converted warehouse. Their guard Tomasz Okafor wears the "
     "number eleven, and the coach, Linnea Barros, joined the club from a team in the south.",
     "Who is the coach of the Eastvale Rovers?", ["Tomasz Okafor", "Ada Penrose", "Linnea Barros",
                                                  "Fergus Moyle"], 2),
    ("A landslide near Corran Head covered the railway with earth and rock. The operator, Northline, ran "
     "buses between Corran Head and Selby Point. Geologists will decide whether to build a wall.",
     "Which company operates the railway?", ["Sunmeadow", "Northline", "Castellan", "Brightwell"], 1),
    ("Brightwell Systems makes a scheduling program for hospitals. It was founded in the river town of "
     "Wexley by two former schoolteachers and employs 180 people there.",
     "Where was Brightwell Systems founded?", ["Orlandt", "Brennock", "Wexley", "Alderford"], 2),
    ("In the province of Valmora, mobile clinics visit remote mountain villages. The clinics carry "
     "vaccines in blue cool boxes and stop at each village on the first Tuesday of the month.",
     "What colour are the cool boxes?", ["blue", "green", "white", "orange"], 0),
    ("The city museum of Orlandt shows the skeleton of a mammoth found in a clay pit. The skeleton now "
     "stands in a walking pose in the natural history hall, beneath a new glass roof.",
     "Where was the mammoth found?", ["in a river bed", "in a clay pit", "in a cave", "under a farm"], 1),
    ("Fishermen in Brennock landed a record herring catch this year after a cold spring. The fish are "
     "sold at a morning auction on the harbour wall, which starts at six o'clock.",
     "Which fish did the Brennock fishermen catch in record numbers?", ["cod", "mackerel", "herring",
                                                                        "salmon"], 2),
    ("The solar farm outside Drummerton was built on an old quarry. Sheep graze between the panels to keep "
     "the grass short, and a belt of trees hides the farm from the hiking trail.",
     "Which animals graze between the solar panels?", ["goats", "cows", "horses", "sheep"], 3),
    ("Schools in Alderford will try a four-day week. Lessons run from Monday to Thursday, and on Fridays "
     "pupils can join sports clubs or tutoring while teachers attend training.",
     "On which day are there no regular lessons?", ["Monday", "Wednesday", "Friday", "Thursday"], 2),
    ("The lighthouse on Kell Point is painted with red and white stripes. Its keeper, Ionel Varga, climbs "
     "its 214 steps every evening to light the lamp, which can be seen for twenty miles.",
     "How many steps does the lighthouse have?", ["114", "214", "240", "412"], 1),
    ("The orchard at Farrow grows three kinds of apple. The late harvest variety, called Autumn Bell, is "
     "picked in November and keeps until spring in the cold stone cellar under the farmhouse.",
     "When is the Autumn Bell variety picked?", ["in June", "in August", "in September", "in November"], 3),
]


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "choices.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for number, (passage, question, choices, gold) in enumerate(QUESTIONS, 1):
            f.write(json.dumps({"id": f"smoke-qa-{number:03d}",
                                "context": f"{passage}\nQuestion: {question}\nAnswer:",
                                "choices": [f" {choice}" for choice in choices], "gold": gold}) + "\n")


if __name__ == "__main__":
    main()
