"""Two sentence-pair tasks over one shared world of people, actions and places (close to each other).

``nli``: does the premise entail the hypothesis, contradict it, or neither (3 classes)? Entailments
generalise (drop a detail, use a hypernym or a synonym), contradictions negate or swap in an
incompatible action or place, neutral hypotheses add a detail the premise does not give; every class
keeps high word overlap, and premises are sometimes negated themselves.

``paraphrase``: do two sentences mean the same thing? Paraphrases use passive voice, synonyms and
reordering; non-paraphrases keep almost all words but swap roles, change a number, a day, the place,
negate, or use an opposite verb.
"""

from __future__ import annotations

from sample_adapters.taskgen.common import Ctx, TaskSpec

# person -> hypernym used by entailing hypotheses
PEOPLE = {
    "surgeon": "doctor", "nurse": "health worker", "pilot": "crew member", "violinist": "musician",
    "drummer": "musician", "teenager": "young person", "toddler": "child", "grandmother": "woman",
    "fisherman": "man", "carpenter": "worker", "plumber": "worker", "chef": "cook", "waiter": "worker",
    "ballerina": "dancer", "student": "young person", "professor": "teacher", "farmer": "worker",
    "firefighter": "rescuer", "police officer": "officer", "librarian": "employee", "boy": "child",
    "girl": "child", "old man": "man", "businesswoman": "woman", "soldier": "person", "tourist": "visitor",
    "mechanic": "worker", "painter": "artist", "sculptor": "artist", "jogger": "runner",
}
# activity -> (synonymous paraphrase, incompatible activity)
ACTIVITIES = {
    "reading a newspaper": ("looking through a paper", "sleeping soundly"),
    "eating a sandwich": ("having a sandwich", "fasting all day"),
    "riding a bicycle": ("cycling", "standing still"),
    "playing the guitar": ("strumming a guitar", "sitting in silence"),
    "painting a fence": ("putting paint on a fence", "tearing down a fence"),
    "climbing a ladder": ("going up a ladder", "lying in bed"),
    "cooking dinner": ("preparing an evening meal", "sleeping through dinner"),
    "washing a car": ("cleaning a car", "driving a car through mud"),
    "talking on the phone": ("having a phone call", "sitting silently"),
    "carrying a box": ("holding a box", "empty-handed"),
    "jumping into a lake": ("diving into a lake", "staying dry on the shore"),
    "fixing a roof": ("repairing a roof", "breaking a roof"),
    "writing a letter": ("composing a letter", "tearing up a letter"),
    "feeding the ducks": ("giving food to the ducks", "chasing the ducks away"),
    "buying vegetables": ("purchasing vegetables", "selling vegetables"),
    "pushing a stroller": ("wheeling a stroller", "carrying the baby in her arms"),
    "singing a song": ("performing a song", "keeping completely quiet"),
    "walking a dog": ("taking a dog for a walk", "asleep next to a dog"),
    "building a sandcastle": ("making a sandcastle", "kicking over a sandcastle"),
    "watching television": ("looking at the tv", "asleep with the tv off"),
    "planting flowers": ("putting flowers in the ground", "pulling up flowers"),
    "catching a fish": ("landing a fish", "releasing every fish"),
    "laughing loudly": ("roaring with laughter", "crying quietly"),
    "running a marathon": ("racing in a marathon", "resting on a couch"),
}
PLACES = [
    ("in a park", "indoors"), ("at the beach", "in an office"), ("on a crowded street", "alone in a field"),
    ("in a kitchen", "outside in the snow"), ("in a library", "at a loud concert"), ("on a boat", "on dry land"),
    ("in the mountains", "at sea level on the coast"), ("at a train station", "at home"),
    ("in a hospital", "on a farm"), ("in a classroom", "in a swimming pool"), ("on a rooftop", "in a basement"),
    ("in a forest", "in a shopping mall"), ("at a market", "in a quiet bedroom"),
    ("in the desert", "in a rainforest"), ("at a wedding", "at a funeral"), ("in a garage", "on a beach"),
]
ADJS = [
    "young", "tall", "tired", "smiling", "elderly", "bearded", "cheerful", "nervous", "sunburned",
    "barefoot", "muscular", "blond", "hungry", "soaked", "sleepy", "careful", "determined", "grinning",
]
REASONS = [
    "because it is their birthday", "for a television show", "to win a bet", "for the first time",
    "because they were asked to", "to impress a friend", "for charity", "as part of a competition",
    "while waiting for a bus", "to earn some money", "before going to work", "after a long day",
]
# paraphrase world: agent, verb (past) with synonym, passive participle, opposite
VERBS = {
    "bought": ("purchased", "bought", "sold"), "praised": ("complimented", "praised", "criticized"),
    "hired": ("employed", "hired", "fired"), "visited": ("went to see", "visited", "avoided"),
    "helped": ("assisted", "helped", "ignored"), "called": ("phoned", "called", "ignored the calls of"),
    "thanked": ("expressed gratitude to", "thanked", "blamed"), "invited": ("asked over", "invited", "turned away"),
    "defeated": ("beat", "defeated", "lost to"), "met": ("saw", "met", "missed"),
    "trusted": ("relied on", "trusted", "doubted"), "followed": ("went after", "followed", "led"),
    "rescued": ("saved", "rescued", "abandoned"), "interviewed": ("questioned", "interviewed", "ignored"),
}
NAMES = [
    "anna", "marco", "the mayor", "the coach", "my neighbor", "the landlord", "the new manager", "sofia",
    "david", "the journalist", "the young lawyer", "priya", "the old farmer", "the senator", "lucas",
    "the actress", "the referee", "kenji", "the headmaster", "fatima", "the banker", "oliver", "the nurse",
    "the chef", "the detective", "maria", "the pilot", "tom", "the author", "the twins",
]
TIMES = [
    ("on monday", "on tuesday"), ("yesterday", "last week"), ("in march", "in october"),
    ("this morning", "this evening"), ("last summer", "last winter"), ("at noon", "at midnight"),
    ("on friday", "on sunday"), ("in 2019", "in 2021"), ("two days ago", "two years ago"),
    ("after lunch", "before breakfast"),
]
NUMBERS = [("two", "three"), ("five", "six"), ("ten", "twelve"), ("three", "four"), ("seven", "nine"),
           ("twenty", "thirty"), ("eight", "eighteen"), ("four", "forty")]
OBJECTS = ["cars", "paintings", "tickets", "houses", "horses", "computers", "books", "boats", "bikes", "shares",
           "chairs", "cakes", "watches", "rings", "apartments", "lamps"]

NLI_WORDS = {
    "person": list(PEOPLE), "activity": list(ACTIVITIES), "place": [p for p, _ in PLACES], "adj": ADJS,
    "reason": REASONS,
}
PARA_WORDS = {"verb": list(VERBS), "name": NAMES, "obj": OBJECTS}
CLOSED = {"time": [t for t, _ in TIMES], "number": [n for n, _ in NUMBERS]}
_OTHER_PLACE = dict(PLACES)
_OTHER_TIME = dict(TIMES)
_OTHER_NUMBER = dict(NUMBERS)


def _nli(ctx: Ctx, label: int) -> tuple[str, str]:
    """Labels: 0 entailment, 1 neutral, 2 contradiction."""
    person, act, place = ctx.w("person"), ctx.w("activity"), ctx.w("place")
    adj, other_adj = ctx.ws("adj", 2)
    synonym, incompatible = ACTIVITIES[act]
    negated = ctx.coin(0.2)
    if negated:  # "the surgeon is not riding a bicycle in a park": only simple hypotheses stay valid
        premise = ctx.pick("neg_premise", [
            "the {a} {p} is not {x} {l}", "a {a} {p} is not {x} {l}", "there is no {p} {x} {l}",
        ]).format(a=adj, p=person, x=act, l=place)
        hyp = ctx.pick(f"neg_hyp{label}", [
            ["the {p} is not {x}", "no {a} {p} is {x} {l}", "it is not true that the {p} is {x} {l}"],
            ["the {p} is {y}", "the {p} is {b}", "the {p} is {l} {r}"],
            ["the {a} {p} is {x} {l}", "the {p} is {x} {l} right now", "the {p} is {z} {l}, {x}"],
        ][label])
        return premise, hyp.format(a=adj, p=person, x=act, l=place, y=incompatible, r=ctx.w("reason"),
                                   z=ctx.choice(["clearly", "definitely", "happily"]),
                                   b=other_adj)
    premise = ctx.pick("premise", [
        "a {a} {p} is {x} {l}", "the {a} {p} is {x} {l}", "{l}, a {a} {p} is {x}",
        "a {p} who looks {a} is {x} {l}", "there is a {a} {p} {x} {l}", "a {a} {p} is busy {x} {l}",
    ]).format(a=adj, p=person, x=act, l=place)
    hyp = ctx.pick(f"hyp{label}", [
        ["a {h} is {x}", "someone is {x} {l}", "the {p} is {s}", "a {p} is {x}", "a {h} is {x} {l}",
         "there is a {p} {l}", "a {a} {h} is {s}", "a person is {s} {l}"],
        ["a {p} is {x} {l} {r}", "the {a} {p} is {x} with a friend", "a {p} is {x} {l} for the first time",
         "the {p} is {x} and feels {b}", "a {b} {p} is {x} {l}", "the {p} {l} is {x} {r}",
         "a {h} is {s} {r}", "the {p} is famous for {x}"],
        ["a {p} is {y} {l}", "the {a} {p} is not {x}", "nobody is {x} {l}", "a {p} is {x} {o}",
         "the {p} is {y}", "a {h} is {y} {l}", "there is no {p} {l}", "the {a} {p} refuses to be {x}"],
    ][label])
    return premise, hyp.format(a=adj, p=person, x=act, l=place, h=PEOPLE[person], s=synonym, y=incompatible,
                               r=ctx.w("reason"), b=other_adj,
                               o=_OTHER_PLACE[place])


def _paraphrase(ctx: Ctx, label: int) -> tuple[str, str]:
    """Labels: 0 not paraphrase, 1 paraphrase."""
    a, b = ctx.ws("name", 2)
    verb = ctx.w("verb")
    syn, participle, opposite = VERBS[verb]
    time, num, obj = ctx.w("time"), ctx.w("number"), ctx.w("obj")
    first = ctx.pick("sent", [
        "{a} {v} {b} {t}", "{t}, {a} {v} {b}", "{a} {v} {b} {t} after {n} {o}",
        "{a} finally {v} {b} {t}", "{a} {v} {b} {t} at the office",
    ])
    kw = dict(a=a, b=b, v=verb, t=time, n=num, o=obj)
    s1 = first.format(**kw)
    if label == 1:
        form = ctx.pick("para", [
            "{b} was {pp} by {a} {t}", "{t}, {a} {syn} {b}", "{a} {syn} {b} {t}",
            "it was {a} who {v} {b} {t}", "{b} was the one {a} {v} {t}", "{t} {b} was {pp} by {a}",
        ])
        s2 = form.format(syn=syn, pp=participle, **kw)
        if "after" in s1:
            s2 += f" after {num} {obj}"
        if "office" in s1:
            s2 += " at the office"
    else:
        change = ctx.pick("change", ["swap", "time", "opposite", "negate", "number", "swap_passive"])
        if change == "swap":
            s2 = f"{b} {verb} {a} {time}"
        elif change == "swap_passive":
            s2 = f"{a} was {participle} by {b} {time}"
        elif change == "time":
            s2 = f"{a} {syn} {b} {_OTHER_TIME[time]}"
        elif change == "opposite":
            s2 = f"{a} {opposite} {b} {time}"
        elif change == "negate":
            s2 = f"{a} did not {_base(verb)} {b} {time}"
        else:
            s1 = f"{a} {verb} {b} {time} after {num} {obj}"
            s2 = f"{a} {syn} {b} {time} after {_OTHER_NUMBER[num]} {obj}"
        if "after" in s1 and "after" not in s2:
            s2 += f" after {num} {obj}"
        if "office" in s1:
            s2 += " at the office"
    if ctx.coin(0.5):
        s1, s2 = s2, s1
    return s1, s2


_BASE = {"bought": "buy", "met": "meet", "defeated": "defeat", "followed": "follow", "praised": "praise",
         "hired": "hire", "visited": "visit", "helped": "help", "called": "call", "thanked": "thank",
         "invited": "invite", "trusted": "trust", "rescued": "rescue", "interviewed": "interview"}


def _base(verb: str) -> str:
    return _BASE[verb]


NLI = TaskSpec(
    name="nli",
    labels=["entailment", "neutral", "contradiction"],
    description="Premise/hypothesis inference, 3 classes (hypernyms, synonyms, negated premises, added details).",
    open_words=NLI_WORDS,
    closed_words={},
    make=_nli,
    pair=True,
)
PARAPHRASE = TaskSpec(
    name="paraphrase",
    labels=["not_paraphrase", "paraphrase"],
    description="Do two sentences mean the same (passive, synonyms; negatives swap roles, times, numbers)?",
    open_words=PARA_WORDS,
    closed_words=CLOSED,
    make=_paraphrase,
    pair=True,
)
