"""Writes news.jsonl: 10 self-written, fictional news-style articles with reference summaries.

NOT CNN/DailyMail, XSum, Multi-News or GovReport: every sentence was written for this project (places,
people and organisations are invented). Run: python data/summarization_smoke/make_smoke.py
"""
import json
import os

ARTICLES = [
    ("smoke-001",
     "The town council of Harrowmere voted on Tuesday to close the old Millbrook footbridge after engineers "
     "found deep cracks in two of its three stone piers. The bridge, built in 1871, carries about 2,000 "
     "pedestrians a day between the railway station and the market square. Council leader Ada Penrose said "
     "the decision was taken reluctantly but that public safety had to come first. A temporary ferry service "
     "will run from Monday, and a shuttle bus will connect the station with the town centre every fifteen "
     "minutes. Engineers estimate that repairs will cost 3.4 million pounds and take at least eighteen "
     "months. Local shop owners warned that the closure could cut their trade by a third during the busy "
     "summer season. The council has asked the regional government for emergency funding and expects an "
     "answer within six weeks.",
     "Harrowmere council closed the 1871 Millbrook footbridge after engineers found cracks in two piers. "
     "A temporary ferry and a shuttle bus will replace it while repairs costing 3.4 million pounds take at "
     "least eighteen months. Shop owners fear a loss of trade and the council has asked for emergency funding."),
    ("smoke-002",
     "Researchers at the Lindqvist Institute have grown a variety of winter wheat that needs a quarter less "
     "water than the strains farmers use today. The team, led by plant biologist Dr. Mirela Stanescu, crossed "
     "a common bread wheat with a wild grass collected on dry hillsides in the south of the country. In field "
     "trials over three seasons the new variety produced almost the same harvest as the standard strain "
     "while receiving 25 percent less irrigation. The grain also kept its baking quality, according to tests "
     "by a national bakers' association. Dr. Stanescu said the seeds could reach farmers within four years "
     "if regulators approve them. Farm groups welcomed the results but cautioned that the trials were held "
     "in only two regions and that wider testing was needed before the variety could be recommended.",
     "The Lindqvist Institute has bred a winter wheat that needs 25 percent less water with almost the same "
     "harvest. The variety, crossed with a wild hillside grass, kept its baking quality in three seasons of "
     "trials. It could reach farmers in four years, though farm groups want wider testing."),
    ("smoke-003",
     "The Eastvale Rovers won the national basketball cup on Saturday, beating the Port Cassel Mariners 88 to "
     "84 in a tense final watched by 14,000 fans. Rovers guard Tomasz Okafor scored 31 points, including two "
     "free throws with nine seconds left that sealed the result. The Mariners had led by eleven points at "
     "half time, but a strong defensive third quarter turned the game. It is the first national title for "
     "the Rovers, a club founded only twelve years ago in a converted warehouse. Coach Linnea Barros praised "
     "her young squad, saying that nobody had expected them to reach the final. Celebrations continued late "
     "into the night in Eastvale, where the club will hold an open parade on Monday afternoon.",
     "Eastvale Rovers beat Port Cassel Mariners 88-84 to win their first national basketball cup. Tomasz "
     "Okafor scored 31 points, sealing the game with late free throws after the Rovers overturned an "
     "eleven-point half-time deficit. The twelve-year-old club will hold a parade on Monday."),
    ("smoke-004",
     "Passengers on the northern coastal railway faced delays of up to three hours on Thursday after a "
     "landslide covered the tracks near the village of Corran Head. Heavy rain over the previous two days "
     "loosened a section of the cliff, and about 400 tonnes of earth and rock slid onto the line shortly "
     "before dawn. No trains were in the area at the time and nobody was hurt. The rail operator, Northline, "
     "arranged replacement buses between Corran Head and Selby Point while crews cleared the debris. A "
     "spokesperson said the line should reopen by Saturday morning but warned that further rain could slow "
     "the work. Geologists have been asked to survey the cliff, which has slipped twice in the last ten "
     "years, and to recommend whether a protective wall should be built.",
     "A landslide of about 400 tonnes near Corran Head blocked the northern coastal railway after heavy rain, "
     "delaying passengers by up to three hours. Nobody was hurt and Northline ran replacement buses. The line "
     "should reopen by Saturday and geologists will survey the cliff."),
    ("smoke-005",
     "A small software company from the river town of Wexley has been bought by one of the largest "
     "technology groups in the country for 210 million dollars. Brightwell Systems, founded six years ago by "
     "two former schoolteachers, makes a scheduling program used by more than 3,000 hospitals and clinics. "
     "Its founders, Hana Yoshida and Emeka Lorne, said the deal would let them hire more engineers and expand "
     "abroad. The buyer, Castellan Group, promised to keep the company's 180 staff in Wexley and to open a "
     "new research office in the town. Local officials described the sale as the biggest business news in "
     "Wexley for decades. Some customers expressed concern that prices could rise, but Castellan said that "
     "existing contracts would not change for at least two years.",
     "Castellan Group bought Brightwell Systems, a Wexley maker of hospital scheduling software, for 210 "
     "million dollars. The founders, two former teachers, plan to hire and expand abroad, and Castellan will "
     "keep the 180 staff in Wexley. Existing contracts will not change for two years."),
    ("smoke-006",
     "Health officials in the province of Valmora have launched a campaign to vaccinate 90 percent of "
     "children under five against measles by the end of the year, after 46 cases were reported in the spring. "
     "Mobile clinics will visit remote mountain villages where vaccination rates have fallen below 70 "
     "percent, and schools will send reminders to parents. Provincial health director Dr. Samuel Achterberg "
     "said most of the recent cases involved children who had missed their second dose during a period when "
     "several clinics were closed for renovation. The campaign will cost about 1.2 million euros, paid from "
     "the provincial emergency budget. Doctors urged parents to check their children's records and said the "
     "vaccine was safe, free and available at every health centre in the province.",
     "Valmora launched a campaign to vaccinate 90 percent of under-fives against measles after 46 spring "
     "cases. Mobile clinics will visit mountain villages with low vaccination rates, many cases being "
     "children who missed a second dose. The campaign costs about 1.2 million euros."),
    ("smoke-007",
     "The city museum of Orlandt has reopened its natural history hall after a four-year renovation that "
     "cost 28 million euros. The hall's most famous exhibit, the skeleton of a mammoth found in a local clay "
     "pit in 1903, has been cleaned and mounted in a new walking pose based on recent research. Visitors can "
     "also explore a room that recreates the sounds and smells of the region's forests during the last ice "
     "age. Museum director Ingrid Halvorsen said the renovation had repaired a leaking glass roof that had "
     "threatened the collection. More than 5,000 people visited on the opening weekend, many of them families "
     "with young children. Entry to the hall will be free on the first Sunday of every month.",
     "Orlandt's city museum reopened its natural history hall after a four-year, 28-million-euro renovation "
     "that fixed a leaking roof. Its 1903 mammoth skeleton has a new walking pose and an ice-age room was "
     "added. Over 5,000 people came on the opening weekend."),
    ("smoke-008",
     "Fishermen in the harbour town of Brennock say this year's herring catch is the best in two decades, "
     "after a cold spring brought large shoals close to the coast. The local fishing cooperative reported "
     "landing 12,500 tonnes by the end of August, almost double last year's total. Prices at the morning "
     "auction have fallen as a result, and some boats have stayed in port to avoid flooding the market. "
     "Marine scientists from the coastal research station said the good season did not mean that stocks had "
     "fully recovered from overfishing in the 1990s, and they urged the government to keep the current "
     "catch limits. The cooperative's chair, Fergus Moyle, said the extra income would help many families "
     "repair boats and pay off debts built up during several poor years.",
     "Brennock fishermen landed 12,500 tonnes of herring by August, nearly double last year, after a cold "
     "spring brought shoals near the coast. Auction prices fell and some boats stayed in port. Scientists "
     "said stocks have not fully recovered and urged keeping catch limits."),
    ("smoke-009",
     "A new solar farm covering 300 hectares of former quarry land opened outside the town of Drummerton on "
     "Wednesday. The farm's 540,000 panels can supply electricity to about 60,000 homes, according to the "
     "operator, Sunmeadow Energy. The site was chosen because the old quarry could not be used for farming "
     "and lies close to an existing power line. Sheep will graze between the rows of panels to keep the "
     "grass short, an arrangement the company says also supports local farmers. Some residents had opposed "
     "the project, arguing that it would spoil views from a popular hiking trail, and the company agreed to "
     "plant a belt of trees along the trail. The regional energy minister said the farm would help the "
     "region meet its target of producing half its power from renewable sources by 2030.",
     "Sunmeadow Energy opened a 300-hectare solar farm on former quarry land near Drummerton that can power "
     "about 60,000 homes. Sheep graze between the panels and trees were planted after residents objected to "
     "spoiled views. The farm helps the region's 2030 renewable target."),
    ("smoke-010",
     "Teachers in the district of Alderford will trial a four-day school week from September, the district "
     "education board announced on Friday. Pupils at twelve primary schools will attend longer lessons from "
     "Monday to Thursday, while Fridays will be used for sports clubs, tutoring and teacher training. The "
     "board said the trial was a response to difficulties in recruiting teachers, many of whom have left for "
     "neighbouring districts offering more flexible hours. Parents' groups were divided: some welcomed the "
     "extra activities, while others worried about childcare on Fridays. The board promised free supervised "
     "activities for any child whose parents work that day. Results of the one-year trial, including test "
     "scores and teacher retention, will be published before a decision is made on extending it.",
     "Alderford will trial a four-day school week at twelve primary schools from September, with Fridays for "
     "clubs, tutoring and teacher training. The board hopes it will help recruit teachers. Parents are "
     "divided over childcare, and free supervised activities were promised; results will be published."),
]


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "news.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for sample_id, document, summary in ARTICLES:
            f.write(json.dumps({"id": sample_id, "document": document, "summary": summary}) + "\n")


if __name__ == "__main__":
    main()
