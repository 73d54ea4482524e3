"""Sentiment of movie reviews and of product reviews (two close tasks: shared grammar and polarity words).

The label is the reviewer's overall verdict. What makes it hard: negated adjectives flip polarity
("the plot was not dull" is positive), contrast clauses where the second part wins ("X but Y",
"although X, Y"), the winning clause placed first ("Y, even though X"), comparisons with another
title or product whose polarity is opposite, expectations that were overturned, and neutral
filler sentences as distractors.
"""

from __future__ import annotations

from sample_adapters.taskgen.common import Ctx, TaskSpec

POS = [
    "great", "wonderful", "excellent", "superb", "brilliant", "fantastic", "delightful", "impressive",
    "outstanding", "solid", "lovely", "remarkable", "charming", "terrific", "marvelous", "pleasant",
    "enjoyable", "satisfying", "stunning", "flawless", "exceptional", "fabulous", "admirable",
    "splendid", "first-rate", "top-notch", "refreshing", "memorable", "polished", "thoughtful",
    "elegant", "smart", "clever", "rewarding", "excellent value", "a real pleasure", "spot on",
    "nice", "good", "decent", "sublime", "magnificent", "wholesome", "inspired", "gorgeous",
]
NEG = [
    "terrible", "awful", "dreadful", "poor", "disappointing", "mediocre", "boring", "dull", "weak",
    "sloppy", "tedious", "annoying", "bland", "clumsy", "lousy", "pathetic", "horrible", "forgettable",
    "frustrating", "lifeless", "shoddy", "painful", "unbearable", "messy", "tiresome", "underwhelming",
    "a letdown", "a waste", "second-rate", "subpar", "flat", "dreary", "irritating", "miserable",
    "pointless", "cheap", "bad", "atrocious", "abysmal", "lackluster", "half-baked", "inept",
    "unpleasant", "clunky", "stale",
]
INTENS = ["really", "very", "truly", "quite", "incredibly", "rather", "remarkably", "pretty", "so", "", "", ""]
NEGATORS = ["not", "never", "hardly", "not at all", "in no way", "anything but"]

MOVIE_ASPECTS = [
    "acting", "plot", "soundtrack", "cinematography", "pacing", "dialogue", "ending", "script",
    "direction", "visual effects", "cast", "score", "editing", "humor", "story", "lead performance",
    "screenplay", "camera work", "casting", "costume design", "final act", "opening scene",
    "character development", "set design", "plot twist", "villain", "storyline", "writing",
    "premise", "lighting", "choreography", "narration",
]
MOVIE_WORDS = {
    "title": ["the sequel", "the remake", "the original", "the first film", "the trailer", "the book",
              "last year's version", "the director's previous film", "the tv series", "the novel"],
    "viewer": ["my wife", "my kids", "my friends", "my brother", "the audience", "my parents", "my roommate",
               "the critics", "my sister", "my date"],
    "filler": [
        "i saw it on a rainy sunday", "we watched it at the local cinema", "it runs a little over two hours",
        "i went in knowing nothing about it", "it was released last spring", "i streamed it last night",
        "the theater was half empty", "it is based on a true story", "the film is set in the nineteen fifties",
        "it was shot in eastern europe", "i watched it with subtitles", "it premiered at a festival",
        "the director is known for documentaries", "it is the third film in the series",
        "i bought the tickets online", "the popcorn was expensive",
    ],
    "thing": ["movie", "film", "picture", "feature", "thriller", "comedy", "drama", "documentary", "western",
              "musical", "cartoon", "horror flick", "romance", "biopic", "mystery", "war film"],
}
PRODUCT_ASPECTS = [
    "battery", "screen", "delivery", "packaging", "customer service", "price", "build quality",
    "sound", "keyboard", "charger", "manual", "setup", "fabric", "handle", "lid", "zipper", "motor",
    "blade", "strap", "camera", "speaker", "display", "remote", "cable", "finish", "stitching",
    "hinge", "fit", "grip", "warranty service", "app", "touchscreen",
]
PRODUCT_WORDS = {
    "title": ["my old one", "the cheaper model", "the previous version", "the brand's other products",
              "the one in the store", "the pictures online", "my last phone", "the competitor's model",
              "the one i returned", "the older generation"],
    "viewer": ["my husband", "my kids", "my coworkers", "my neighbor", "my mother", "my son", "my daughter",
               "my roommate", "my whole family", "my partner"],
    "filler": [
        "i ordered it on a tuesday", "it arrived in a brown box", "i bought it as a gift",
        "i have had it for three weeks", "it comes in four colors", "i paid with a gift card",
        "i use it mostly in the kitchen", "it replaced an older model", "i found it through a friend",
        "it was on sale last month", "i mainly use it at work", "the seller is based overseas",
        "it weighs about two pounds", "i got the blue one", "i read the reviews first",
        "it came with two batteries",
    ],
    "thing": ["blender", "laptop", "vacuum", "kettle", "backpack", "headset", "phone case", "toaster",
              "drill", "lamp", "mattress", "monitor", "jacket", "printer", "router", "coffee maker"],
}
CLOSED = {"intens": INTENS, "negator": NEGATORS}


def _adj(ctx: Ctx, positive: bool) -> str:
    return ctx.w("pos" if positive else "neg")


def _clause(ctx: Ctx, positive: bool) -> str:
    """A clause with the given polarity, possibly through a negated opposite adjective."""
    aspect = ctx.w("aspect")
    if ctx.coin(0.25):  # negated opposite: "the plot was not dull" is positive
        form = ctx.pick("neg_clause", [
            "the {a} was {n} {j}", "the {a} is {n} {j}", "i would never call the {a} {j}",
            "the {a} was not what i would call {j}", "nobody could say the {a} was {j}",
            "the {a} never felt {j}", "i did not find the {a} {j}", "the {a} was far from {j}",
        ])
        return form.format(a=aspect, n=ctx.w("negator"), j=_adj(ctx, not positive))
    form = ctx.pick("clause", [
        "the {a} was {i} {j}", "the {a} is {i} {j}", "the {a} felt {i} {j}", "i found the {a} {i} {j}",
        "the {a} seemed {i} {j}", "the {a} turned out {i} {j}", "honestly the {a} was {i} {j}",
        "overall the {a} was {i} {j}", "the {a} looked {i} {j}", "i thought the {a} was {i} {j}",
    ])
    return form.format(a=aspect, i=ctx.w("intens"), j=_adj(ctx, positive))


def _make(ctx: Ctx, label: int) -> tuple[str, None]:
    p = bool(label)
    structure = ctx.pick("review", [  # easy (one polarity) structures are listed more than once
        "{c+}", "{c+}", "{c+}",
        "{c+} and {c+}", "{c+} and {c+}",
        "{f}. {c+}", "{f}. {c+}",
        "{c+}. {f}", "{c+}. {f}",
        "{c+}, and {c+} too",
        "{c-} but {c+}",
        "although {c-}, {c+}",
        "{c+}, even though {c-}",
        "i expected the {t} to be {j-}, but it was {i} {j+}",
        "unlike {title}, which was {j-}, this {t} was {i} {j+}",
        "{v} said the {t} would be {j-}. {c+}",
        "{c-} at first, but in the end {c+}",
        "i was afraid the {t} would be {j-}, but {c+}",
        "sure, {c-}. still, {c+}",
        "{c+}; the only complaint is that {c-}",
    ])
    text = structure
    while "{c+}" in text:
        text = text.replace("{c+}", _clause(ctx, p), 1)
    while "{c-}" in text:
        text = text.replace("{c-}", _clause(ctx, not p), 1)
    return text.format(
        f=ctx.w("filler"), t=ctx.w("thing"), title=ctx.w("title"), v=ctx.w("viewer"), i=ctx.w("intens"),
        **{"j+": _adj(ctx, p), "j-": _adj(ctx, not p)},
    ), None


def _spec(name: str, aspects: list[str], words: dict[str, list[str]], what: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        labels=["negative", "positive"],
        description=f"Overall sentiment of a {what} (negation, contrast clauses, distractor sentences).",
        open_words={"pos": POS, "neg": NEG, "aspect": aspects, **words},
        closed_words=CLOSED,
        make=_make,
    )


MOVIES = _spec("sentiment_movies", MOVIE_ASPECTS, MOVIE_WORDS, "movie review")
PRODUCTS = _spec("sentiment_products", PRODUCT_ASPECTS, PRODUCT_WORDS, "product review")
