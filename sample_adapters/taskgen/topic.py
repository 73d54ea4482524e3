"""Topic of a news headline: world politics, sports, business, science and technology.

The topic is fixed by the headline's main frame (its subject, verb and object). What makes it hard:
a trailing phrase from another topic ("... amid election uncertainty"), frames that mention an
entity of another topic ("striker's club posts record revenue" is business), and held-out nouns
and names seen only at test time (half of every word list; 70% of test draws).
"""

from __future__ import annotations

from sample_adapters.taskgen.common import Ctx, TaskSpec

TOPICS = ["world", "sports", "business", "science"]

WORDS = {
    "world_actor": [
        "prime minister", "parliament", "foreign minister", "opposition leader", "senate", "president",
        "un envoy", "coalition government", "defense ministry", "peace negotiators", "ruling party",
        "election commission", "interior minister", "rebel leaders", "ambassador", "governor",
        "supreme court", "city council", "border officials", "lawmakers", "diplomats", "cabinet",
    ],
    "world_verb": [
        "signs treaty with", "recalls ambassador from", "imposes sanctions on", "holds talks with",
        "condemns attack on", "opens border with", "announces snap election in", "suspends aid to",
        "expels diplomats from", "calls for ceasefire in", "rejects proposal from", "reaches deal with",
    ],
    "world_obj": [
        "neighboring state", "rebel group", "former colony", "island nation", "breakaway region",
        "allied government", "regional bloc", "military junta", "opposition coalition", "northern province",
        "refugee agency", "southern neighbor",
    ],
    "world_noun": [
        "election", "ceasefire", "referendum", "coup", "sanctions", "peace talks", "protests", "summit",
        "impeachment", "border dispute", "parliamentary vote", "state visit", "asylum policy", "riots",
    ],
    "sports_actor": [
        "striker", "goalkeeper", "head coach", "tennis champion", "sprinter", "quarterback", "home team",
        "defending champions", "midfielder", "captain", "olympic swimmer", "boxer", "cyclist", "pitcher",
        "rookie guard", "national squad", "veteran jockey", "golfer", "wrestler", "skier", "point guard",
        "relay team",
    ],
    "sports_verb": [
        "beats", "draws with", "crushes", "edges past", "loses to", "knocks out", "stuns", "ties with",
        "overpowers", "falls to", "rallies past", "holds off",
    ],
    "sports_obj": [
        "league leaders", "local rivals", "the visitors", "top seed", "reigning champion", "second division side",
        "title contender", "underdogs", "former club", "cup holders", "unbeaten rivals", "the hosts",
    ],
    "sports_noun": [
        "final", "playoffs", "semifinal", "transfer window", "championship", "world cup", "derby",
        "grand slam", "marathon", "penalty shootout", "season opener", "title race", "relegation battle",
        "tournament",
    ],
    "business_actor": [
        "automaker", "retail giant", "central bank", "oil producer", "airline", "shipping firm", "bank",
        "chipmaker", "insurer", "hedge fund", "steel company", "food company", "investors", "shareholders",
        "regulators", "pension fund", "brewer", "telecom operator", "mining group", "carmaker",
        "online retailer", "supermarket chain",
    ],
    "business_verb": [
        "acquires", "posts loss at", "cuts jobs at", "merges with", "raises prices at", "sells stake in",
        "reports record profit at", "buys out", "slashes forecast for", "invests billions in",
        "files for bankruptcy protection for", "lays off staff at",
    ],
    "business_obj": [
        "european unit", "rival firm", "struggling subsidiary", "local supplier", "overseas division",
        "family business", "regional lender", "startup", "joint venture", "parent company",
        "logistics arm", "retail branch",
    ],
    "business_noun": [
        "quarterly earnings", "stock market", "interest rates", "inflation", "merger talks", "share price",
        "profit warning", "trade deficit", "bond yields", "ipo", "dividend", "takeover bid", "recession fears",
        "currency slump",
    ],
    "science_actor": [
        "astronomers", "researchers", "biologists", "physicists", "engineers", "space agency", "geologists",
        "chemists", "neuroscientists", "climate scientists", "software developers", "robotics lab",
        "archaeologists", "mathematicians", "doctors", "geneticists", "ecologists", "virologists",
        "marine biologists", "computer scientists", "oceanographers", "paleontologists",
    ],
    "science_verb": [
        "discover", "map", "sequence", "detect", "photograph", "simulate", "clone", "identify", "measure",
        "decode", "observe", "model",
    ],
    "science_obj": [
        "new exoplanet", "ancient virus", "deep sea species", "distant galaxy", "gene linked to aging",
        "quantum effect", "dinosaur fossil", "black hole", "protein structure", "new mineral",
        "brain circuit", "comet",
    ],
    "science_noun": [
        "vaccine trial", "telescope data", "rocket launch", "gene therapy", "clinical study", "software update",
        "satellite", "particle collider", "artificial intelligence", "solar eclipse", "fossil record",
        "mars rover", "superconductor", "microchip",
    ],
}

TAILS = [
    "amid {n}", "after {n}", "ahead of {n}", "despite {n}", "as {n} looms", "following {n}",
    "during {n}", "in wake of {n}", "days before {n}", "as {n} continues",
]


def _frame(ctx: Ctx, topic: str) -> str:
    """The main frame of a headline about ``topic``."""
    t = topic
    actor, verb, obj, noun = ctx.w(f"{t}_actor"), ctx.w(f"{t}_verb"), ctx.w(f"{t}_obj"), ctx.w(f"{t}_noun")
    other = ctx.choice([x for x in TOPICS if x != t])
    foreign = ctx.w(f"{other}_actor")
    form = ctx.pick("frame_" + t, [
        "{actor} {verb} {obj}",
        "{actor} {verb} {obj} {tail}",
        "{noun}: {actor} {verb} {obj}",
        "{actor} says {noun} will go ahead",
        "{foreign}'s {noun} draws record crowds",
        "report: {actor} {verb} {obj}",
        "{actor} {verb} {obj}, sources say",
        "why the {noun} matters to {foreign}",
        "{noun} {tail}",
        "exclusive: {actor} {verb} {obj} {tail}",
        "{foreign} reacts as {actor} {verb} {obj}",
        "live: {noun} updates",
    ])
    tail = ctx.pick("tail", TAILS).format(n=ctx.w(f"{ctx.choice([x for x in TOPICS if x != t])}_noun"))
    return form.format(actor=actor, verb=verb, obj=obj, noun=noun, foreign=foreign, tail=tail)


def _make(ctx: Ctx, label: int) -> tuple[str, None]:
    return _frame(ctx, TOPICS[label]), None


NEWS = TaskSpec(
    name="news_topic",
    labels=TOPICS,
    description="Topic of a news headline (4 classes; distractor phrases and names from other topics).",
    open_words=WORDS,
    closed_words={},
    make=_make,
    heldout_words=0.5,  # half of every word list is seen only at test time: names carry the topic
    p_heldout=0.7,
)
