"""Three syntactic tasks over one shared clause grammar: acceptability, question vs statement, negation.

``acceptability``: grammatical sentence or a corrupted copy: subtle single edits (subject-verb
agreement across an attractor noun, wrong verb form after an auxiliary, determiner-number mismatch,
swapped adjacent words, a dropped or doubled word, an over-regularised verb such as "writed") and
blunter word-order damage (a shuffled window of four words, two distant words swapped, the second
half reversed).

``question``: is the sentence a question? No punctuation is kept, so the model must read the syntax:
inverted and wh-questions, tag questions and polite indirect questions ("could you tell me where")
against statements that start with a wh-word ("what the chef cooked was ..."), embedded questions
("i wonder whether ...") and inverted statements ("never had the ...", "so did ...").

``negation``: is the main clause negated? Negators of all kinds (not, n't, never, no, nobody,
nothing, neither ... nor, at no point) against distractors: negation inside a relative clause only,
"not only ... but also", and negative-sounding words that are no negation (unhappy, dislike, notable).
"""

from __future__ import annotations

from sample_adapters.taskgen.common import Ctx, TaskSpec

# singular -> plural
NOUNS = {
    "teacher": "teachers", "doctor": "doctors", "manager": "managers", "farmer": "farmers", "child": "children",
    "student": "students", "driver": "drivers", "neighbor": "neighbors", "lawyer": "lawyers", "artist": "artists",
    "soldier": "soldiers", "baker": "bakers", "pilot": "pilots", "nurse": "nurses", "writer": "writers",
    "engineer": "engineers", "woman": "women", "man": "men", "singer": "singers", "guard": "guards",
    "tourist": "tourists", "scientist": "scientists", "chef": "chefs", "judge": "judges", "actor": "actors",
    "clerk": "clerks", "painter": "painters", "miner": "miners", "sailor": "sailors", "dancer": "dancers",
}
# base -> (3sg, past, participle, ing)
VERBS = {
    "write": ("writes", "wrote", "written", "writing"), "eat": ("eats", "ate", "eaten", "eating"),
    "take": ("takes", "took", "taken", "taking"), "see": ("sees", "saw", "seen", "seeing"),
    "give": ("gives", "gave", "given", "giving"), "break": ("breaks", "broke", "broken", "breaking"),
    "choose": ("chooses", "chose", "chosen", "choosing"), "drive": ("drives", "drove", "driven", "driving"),
    "steal": ("steals", "stole", "stolen", "stealing"), "hide": ("hides", "hid", "hidden", "hiding"),
    "forget": ("forgets", "forgot", "forgotten", "forgetting"), "throw": ("throws", "threw", "thrown", "throwing"),
    "find": ("finds", "found", "found", "finding"), "sell": ("sells", "sold", "sold", "selling"),
    "build": ("builds", "built", "built", "building"), "carry": ("carries", "carried", "carried", "carrying"),
    "paint": ("paints", "painted", "painted", "painting"), "fix": ("fixes", "fixed", "fixed", "fixing"),
    "open": ("opens", "opened", "opened", "opening"), "deliver": ("delivers", "delivered", "delivered", "delivering"),
    "read": ("reads", "read", "read", "reading"), "bring": ("brings", "brought", "brought", "bringing"),
    "lose": ("loses", "lost", "lost", "losing"), "sing": ("sings", "sang", "sung", "singing"),
}
OBJECTS = [
    "the letter", "a sandwich", "the old bicycle", "the keys", "a large painting", "the report", "the red car",
    "a birthday cake", "the contract", "the heavy boxes", "a small boat", "the map", "the new fence",
    "the old piano", "a strange song", "the wooden chair", "the lunch boxes", "a silver ring", "the photographs",
    "the broken window", "a long poem", "the package", "the garden gate", "the winter coats",
]
ADVERBS = [
    "yesterday", "last night", "in the morning", "every week", "after dinner", "on sunday", "before noon",
    "at the station", "in the garden", "near the river", "at the market", "during the storm", "in the kitchen",
    "at school", "downtown", "upstairs",
]
ADJS = ["old", "young", "tired", "angry", "new", "friendly", "busy", "quiet", "famous", "careful", "local",
        "lazy", "clever", "nervous", "honest", "brave"]
PLACES_PP = ["near the windows", "with the dogs", "from the villages", "next to the shops", "behind the trucks",
             "beside the lakes", "in the offices", "by the gates"]
OPEN = {"noun": list(NOUNS), "verb": list(VERBS), "obj": OBJECTS, "adv": ADVERBS, "adj": ADJS,
        "pp": PLACES_PP}
CLOSED = {"wh": ["where", "when", "why", "how"], "aux": ["can", "will", "should", "could", "would",
                                                                 "must", "might"]}


def _np(ctx: Ctx, plural: bool) -> str:
    noun = ctx.w("noun")
    noun = NOUNS[noun] if plural else noun
    det = ctx.choice(["the", "these", "those", "some", "many"] if plural else ["the", "this", "that", "a", "every"])
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    return f"{det} {ctx.w('adj')} {noun}" if ctx.coin(0.4) else f"{det} {noun}"


# --------------------------------------------------------------------------------------------- acceptability
def _grammatical(ctx: Ctx) -> tuple[list[str], dict]:
    plural = ctx.coin()
    subj = _np(ctx, plural)
    verb = ctx.w("verb")
    s3, past, part, ing = VERBS[verb]
    info = {"plural": plural, "verb": verb}
    form = ctx.pick("gram", ["present", "past", "perfect", "modal", "attractor", "relative", "progressive"])
    obj, adv = ctx.w("obj"), ctx.w("adv")
    timeless = {"present": ["every day", "often", "on weekends", ""], "modal": ["tomorrow", "next week", "soon", ""],
                "progressive": ["right now", "today", "at the moment", ""]}
    if form in timeless:  # a past-time adverb would make a present or future clause unacceptable
        adv = ctx.choice(timeless[form])
    if form == "present":
        words = f"{subj} {verb if plural else s3} {obj} {adv}"
    elif form == "past":
        words = f"{subj} {past} {obj} {adv}"
    elif form == "perfect":
        words = f"{subj} {'have' if plural else 'has'} {part} {obj}"
    elif form == "modal":
        words = f"{subj} {ctx.w('aux')} {verb} {obj} {adv}"
    elif form == "attractor":
        words = f"{subj} {ctx.w('pp')} {verb if plural else s3} {obj}"
    elif form == "relative":
        words = f"{subj} that the {ctx.w('noun')} saw {'have' if plural else 'has'} {part} {obj}"
    else:
        words = f"{subj} {'are' if plural else 'is'} {ing} {obj} {adv}"
    info["form"] = form
    return words.split(), info


def _corrupt(ctx: Ctx, words: list[str], info: dict) -> list[str]:
    verb, form, plural = info["verb"], info["form"], info["plural"]
    s3, past, part, ing = VERBS[verb]
    swaps = {"has": "have", "have": "has", "is": "are", "are": "is", s3: verb, verb: s3}
    kind = ctx.pick("corrupt", ["agreement", "verb_form", "determiner", "swap", "drop", "double", "double",
                                "scramble", "scramble", "swap_far", "reverse_tail", "overregular", "overregular"])
    out = list(words)
    if kind == "overregular":  # "wrote" -> "writed", "has written" -> "has writed"
        wrong = (verb[:-1] if verb.endswith("e") else verb) + "ed"
        for i, w in enumerate(out):
            if i > 1 and w in (past, part) and wrong not in (past, part):
                out[i] = wrong
                return out
        kind = "double"
    if kind == "scramble":  # shuffle a window of four words
        i = ctx.rng.randrange(0, max(1, len(out) - 3))
        window = out[i:i + 4]
        ctx.rng.shuffle(window)
        return out[:i] + window + out[i + 4:]
    if kind == "swap_far":
        i, j = sorted(ctx.rng.sample(range(len(out)), 2))
        out[i], out[j] = out[j], out[i]
        return out
    if kind == "reverse_tail":
        half = len(out) // 2
        return out[:half] + out[half:][::-1]
    if kind == "agreement":
        for i in range(len(out) - 1, 0, -1):  # the finite verb is after the subject; search from the end
            if out[i] in swaps and form in ("present", "perfect", "attractor", "relative", "progressive"):
                out[i] = swaps[out[i]]
                return out
        kind = "verb_form"
    if kind == "verb_form":
        for i, w in enumerate(out):
            if w in (part, past, verb, s3, ing) and i > 1:
                wrong = {"perfect": past if past != part else ing, "modal": past, "past": ing,
                         "progressive": past}.get(form, ing if w != ing else past)
                if wrong != w:
                    out[i] = wrong
                    return out
        kind = "swap"
    if kind == "determiner":
        det = out[0]
        repl = {"the": "a" if plural else "these", "these": "this", "those": "that", "some": "a", "many": "every",
                "this": "these", "that": "those", "a": "many", "an": "many", "every": "many"}[det]
        out[0] = repl
        return out
    if kind == "drop" and not plural:  # a singular count noun without determiner
        return out[1:]
    if kind in ("drop", "double"):
        i = ctx.rng.randrange(0, len(out))
        return out[: i + 1] + [out[i]] + out[i + 1:]
    i = ctx.rng.randrange(0, len(out) - 1)
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _acceptability(ctx: Ctx, label: int) -> tuple[str, None]:
    """Labels: 0 unacceptable, 1 acceptable."""
    words, info = _grammatical(ctx)
    if label == 0:
        for _ in range(10):
            bad = _corrupt(ctx, words, info)
            if bad != words:
                words = bad
                break
    return " ".join(words), None


# --------------------------------------------------------------------------------------------- question
def _question(ctx: Ctx, label: int) -> tuple[str, None]:
    """Labels: 0 statement, 1 question."""
    plural = ctx.coin()
    subj, subj2 = _np(ctx, plural), _np(ctx, ctx.coin())
    verb = ctx.w("verb")
    s3, past, part, ing = VERBS[verb]
    kw = dict(s=subj, s2=subj2, v=verb, p=past, pp=part, ing=ing, o=ctx.w("obj"), a=ctx.w("adv"),
              wh=ctx.w("wh"), aux=ctx.w("aux"), do="do" if plural else "does", be="are" if plural else "is",
              n=ctx.w("noun"),
              have="have" if plural else "has", pron="they" if plural else ctx.choice(["he", "she"]),
              adj=ctx.w("adj"))
    if label == 1:
        form = ctx.pick("q", [
            "did {s} {v} {o} {a}", "{do} {s} {v} {o}", "{aux} {s} {v} {o} {a}", "{wh} did {s} {v} {o}",
            "{have} {s} {pp} {o} yet", "{be} {s} {ing} {o} {a}", "{s} {p} {o} {a}, didn't {pron}",
            "{s} {p} {o}, right", "could you tell me {wh} {s} {p} {o}", "do you know whether {s} {p} {o}",
            "{wh} {aux} {s} {v} {a}", "isn't it true that {s} {p} {o}", "who {p} {o} {a}", "what did {s} {v} {a}",
            "which {n} {p} {o} {a}", "how often {do} {s} {v} {o}",
        ])
    else:
        form = ctx.pick("st", [
            "{s} {p} {o} {a}", "{s} {aux} {v} {o} {a}", "{wh} {s} {p} was never explained",
            "i wonder {wh} {s} {p} {o}", "{s2} asked whether {s} {p} {o}", "nobody knows {wh} {s} {p} {o}",
            "never {have} {s} {pp} {o} so quickly", "{s} {p} {o}, and so did {s2}",
            "{wh} {s} {v} {o} is up to {pron}", "{s} {be} {ing} {o} {a}", "{s} {have} {pp} {o} already",
            "tell me {wh} {s} {p} {o}", "had {s} {pp} {o}, {s2} would have noticed",
            "{s} {do} {v} {o}, which is {adj}", "{s2} knew who {p} {o}",
        ])
    return form.format(**kw), None


# --------------------------------------------------------------------------------------------- negation
def _negation(ctx: Ctx, label: int) -> tuple[str, None]:
    """Labels: 0 affirmative, 1 negated."""
    plural = ctx.coin()
    subj, subj2 = _np(ctx, plural), _np(ctx, ctx.coin())
    noun = ctx.w("noun")
    verb = ctx.w("verb")
    s3, past, part, ing = VERBS[verb]
    kw = dict(s=subj, s2=subj2, n=noun, ns=NOUNS[noun], v=verb, p=past, pp=part, ing=ing, o=ctx.w("obj"), o2=ctx.w("obj"),
              a=ctx.w("adv"), aux=ctx.w("aux"), be="are" if plural else "is", have="have" if plural else "has",
              pron="they" if plural else ctx.choice(["he", "she"]), adj=ctx.w("adj"))
    if label == 1:
        form = ctx.pick("neg", [
            "{s} did not {v} {o} {a}", "{s} didn't {v} {o}", "{s} never {p} {o}", "no {n} {p} {o} {a}",
            "nobody {p} {o} {a}", "{s} {p} nothing {a}", "neither {s} nor {s2} {p} {o}",
            "{s} {have} not {pp} {o} yet", "{s} {aux} not {v} {o}", "{s} {be} not {ing} {o} {a}",
            "at no point did {s} {v} {o}", "{s} won't {v} {o} {a}", "none of the {ns} {p} {o}",
            "{s} who {p} {o} did not {v} {o2}", "{s} {p} neither {o} nor {o2}",
        ])
    else:
        form = ctx.pick("aff", [
            "{s} {p} {o} {a}", "{s} {aux} {v} {o}", "not only did {s} {v} {o}, {pron} also {p} {o2}",
            "{s} who never {p} {o} {p} {o2}", "{s} {p} {o}, which nobody expected", "{s} {p} the notable {n}",
            "{s} {be} unhappy that the {n} {p} {o}", "{s} {p} {o} for no particular reason, then left",
            "{s} disliked the {n} who {p} {o}", "{s} {have} {pp} {o} {a}", "{s} knotted the rope {a}",
            "{s} {p} {o} even though nobody asked", "{s} {be} {ing} {o} {a}",
            "the {n} that {s} did not see {p} {o}", "{s} {p} {o} because no {n} could",
        ])
    return form.format(**kw), None


ACCEPTABILITY = TaskSpec(
    name="acceptability",
    labels=["unacceptable", "acceptable"],
    description="Grammatical or corrupted (agreement, verb form, determiner, doubled word, scrambled order).",
    open_words=OPEN, closed_words=CLOSED, make=_acceptability,
)
QUESTION = TaskSpec(
    name="question",
    labels=["statement", "question"],
    description="Question or statement without punctuation (indirect questions, wh-statements, inversions).",
    open_words=OPEN, closed_words=CLOSED, make=_question,
    p_heldout=0.75,  # most test sentences use a question or statement form never seen in training
)
NEGATION = TaskSpec(
    name="negation",
    labels=["affirmative", "negated"],
    description="Is the main clause negated? (negators of many kinds; negation only in subclauses; not only).",
    open_words=OPEN, closed_words=CLOSED, make=_negation,
    p_heldout=0.6,
)
