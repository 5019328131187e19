"""Templated text in several domains: the pretraining corpus of the tiny LM and calibration text for masks.

Every draw comes from `Rng`, a small counter-based helper over `shared.prng.raw_u64`, so a seed gives the
same documents on every machine. Domains: product reviews, news, recipes / how-to, code, clinical notes,
dialogues. The review and news generators are reused by `bench.tinylm.tasks` (sentiment / topic labels).

Two corpora: "core" (micro / demo sizes: four news topics) and "rich" (small / medium: the news domain
draws from eight topics, see NEWS_TOPICS_8). The core text is unchanged by anything added for "rich".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from shared.prng import derive_seed, raw_u64

T = TypeVar("T")
_BLOCK = 4096


class Rng:
    """Draws ints, floats, choices and normals from one shared.prng stream, in a fixed order."""

    def __init__(self, seed: int) -> None:
        if not 0 <= seed < 2**64:
            raise ValueError(f"Rng seed must be in [0, 2**64), got {seed}")
        self.seed = seed
        self._offset = 0
        self._buf: list[int] = []
        self._pos = 0
        self._block = 64  # grows to _BLOCK: cheap for the many short per-document streams

    def u64(self) -> int:
        if self._pos == len(self._buf):
            self._buf = raw_u64(self.seed, self._block, self._offset).tolist()
            self._offset += self._block
            self._block = min(2 * self._block, _BLOCK)
            self._pos = 0
        v = self._buf[self._pos]
        self._pos += 1
        return v

    def uniform(self) -> float:
        """A float in (0, 1): 53 random bits, never exactly 0 (safe for log)."""
        return ((self.u64() >> 11) + 0.5) / 9007199254740992.0

    def randint(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 0:
            raise ValueError(f"randint needs n > 0, got {n}")
        return self.u64() % n

    def choice(self, items: Sequence[T]) -> T:
        return items[self.randint(len(items))]

    def chance(self, p: float) -> bool:
        return self.uniform() < p

    def normal(self) -> float:
        """Standard normal by Box-Muller (one value per call; the pair's sine half is dropped)."""
        return math.sqrt(-2.0 * math.log(self.uniform())) * math.cos(2.0 * math.pi * self.uniform())

    def gamma(self, shape: float) -> float:
        """Gamma(shape, 1) by Marsaglia-Tsang; shape < 1 via the boost Gamma(a+1) * U**(1/a)."""
        if shape <= 0:
            raise ValueError(f"gamma shape must be > 0, got {shape}")
        if shape < 1.0:
            return self.gamma(shape + 1.0) * float(self.uniform() ** (1.0 / shape))
        d = shape - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        while True:
            x = self.normal()
            v = (1.0 + c * x) ** 3
            if v <= 0:
                continue
            u = self.uniform()
            if math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
                return d * v

    def dirichlet(self, alphas: Sequence[float]) -> list[float]:
        g = [self.gamma(a) for a in alphas]
        total = sum(g)
        if total <= 0:  # every draw underflowed (tiny alpha): put all mass on one drawn index
            out = [0.0] * len(g)
            out[self.randint(len(g))] = 1.0
            return out
        return [x / total for x in g]

    def shuffle(self, items: list[T]) -> None:
        """Fisher-Yates in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.randint(i + 1)
            items[i], items[j] = items[j], items[i]


# ---------------------------------------------------------------- shared vocabulary
NAMES = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Leo",
         "Maya", "Nora", "Omar", "Paula", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe")
CITIES = ("Berlin", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Seoul", "Tunis", "Porto", "Dublin", "Hanoi",
          "Nairobi", "Austin", "Kyoto", "Madrid", "Riga")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "ten", "twelve", "twenty")

# ---------------------------------------------------------------- reviews
PRODUCTS = ("phone", "laptop", "blender", "jacket", "backpack", "kettle", "lamp", "headset", "camera",
            "chair", "watch", "printer", "tent", "bike", "speaker", "mattress", "toaster", "drill")
ASPECTS = ("battery", "screen", "price", "design", "sound", "build quality", "delivery", "support",
           "size", "weight", "material", "setup", "noise level", "handle")
POS_ADJ = ("great", "excellent", "solid", "reliable", "lovely", "fantastic", "sturdy", "perfect", "smooth",
           "impressive", "comfortable", "bright", "quiet", "wonderful")
NEG_ADJ = ("poor", "terrible", "flimsy", "broken", "awful", "cheap", "noisy", "useless", "disappointing",
           "faulty", "slow", "weak", "horrible", "annoying")
POS_VERB = ("love", "enjoy", "recommend", "like", "trust", "adore")
NEG_VERB = ("regret", "hate", "returned", "dislike", "avoid", "resent")
POS_END = ("Would buy again.", "Five stars from me.", "Worth every penny.", "Highly recommended.",
           "My family is happy with it.", "No complaints at all.")
NEG_END = ("Never again.", "One star.", "Total waste of money.", "Do not buy this.",
           "I want my money back.", "Sent it back after a week.")


def review(rng: Rng, positive: bool) -> str:
    """A product review whose words carry its sentiment (a few neutral / contrasting clauses for realism)."""
    adj, verb, end = (POS_ADJ, POS_VERB, POS_END) if positive else (NEG_ADJ, NEG_VERB, NEG_END)
    other = NEG_ADJ if positive else POS_ADJ
    prod = rng.choice(PRODUCTS)
    parts = [rng.choice((
        f"I bought this {prod} {rng.choice(('last week', 'a month ago', 'for my brother', 'on sale', 'in May'))}.",
        f"This {prod} arrived on {rng.choice(DAYS)}.",
        f"We have used the {prod} for {rng.choice(NUMBERS)} weeks.",
        f"Got the {prod} as a gift.",
    ))]
    for _ in range(1 + rng.randint(3)):
        parts.append(rng.choice((
            f"The {rng.choice(ASPECTS)} is {rng.choice(adj)}.",
            f"I {rng.choice(verb)} the {rng.choice(ASPECTS)}.",
            f"Really {rng.choice(adj)} {rng.choice(ASPECTS)}.",
            f"The {rng.choice(ASPECTS)} feels {rng.choice(adj)} and {rng.choice(adj)}.",
        )))
    if rng.chance(0.3):
        parts.append(f"Only the {rng.choice(ASPECTS)} is a bit {rng.choice(other)}.")
    parts.append(rng.choice(end))
    return " ".join(parts)


# Opinions with negation (rich corpus, `polarity` task): every clause carries the overall polarity, but half
# of them through a negated word of the opposite polarity ("not noisy" = positive, "do not trust" =
# negative) and there are no giveaway end phrases: the words alone say ~nothing, the words with "not" do.
OP_POS_ADJ = ("great", "reliable", "comfortable", "sturdy", "quiet", "bright", "useful", "pleasant", "smooth", "fast")
OP_NEG_ADJ = ("bad", "flimsy", "noisy", "slow", "broken", "awkward", "fragile", "loud", "dull", "weak")
OP_POS_VERB = ("recommend", "love", "enjoy", "trust", "like")
OP_NEG_VERB = ("hate", "dislike", "regret", "resent", "distrust")


def opinion(rng: Rng, positive: bool) -> str:
    """2-3 clauses about a product, each implying `positive`: a plain word of that polarity or a negated
    word of the other one (P=0.5 each)."""
    prod = rng.choice(PRODUCTS)
    parts = [rng.choice((f"Notes on the {prod}.", f"I tried the {prod} for {rng.choice(NUMBERS)} weeks.",
                         f"About my new {prod}.", f"The {prod} came on {rng.choice(DAYS)}."))]
    for _ in range(2 + rng.randint(2)):
        negate = rng.chance(0.5)
        word_pos = positive != negate
        aspect = rng.choice(ASPECTS)
        if rng.chance(0.6):
            adj = rng.choice(OP_POS_ADJ if word_pos else OP_NEG_ADJ)
            parts.append(f"The {aspect} is not {adj}." if negate else f"The {aspect} is {adj}.")
        else:
            verb = rng.choice(OP_POS_VERB if word_pos else OP_NEG_VERB)
            parts.append(f"I do not {verb} the {aspect}." if negate else f"I {verb} the {aspect}.")
    return " ".join(parts)


# ---------------------------------------------------------------- news
NEWS_TOPICS = ("sports", "money", "science", "world")
_NEWS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "sports": (("The home team", "The striker", "The coach", "The champion", "The young runner", "The goalkeeper"),
               ("won the final", "scored twice", "lost the match", "broke the record", "signed a new contract",
                "missed the penalty"),
               ("after extra time", "in front of a full stadium", "during the league game", "at the cup final",
                "in the second half")),
    "money": (("The central bank", "The company", "Investors", "The stock market", "The retailer", "Shareholders"),
              ("raised interest rates", "reported higher profits", "cut prices", "sold its shares",
               "announced a merger", "lost market value"),
              ("after a weak quarter", "as inflation slowed", "amid falling demand", "despite strong sales",
               "before the earnings call")),
    "science": (("Researchers", "The lab", "Astronomers", "A team of biologists", "The physicists", "Engineers"),
                ("discovered a new species", "measured the signal", "published a study", "built a new telescope",
                 "observed a distant planet", "tested a vaccine"),
                ("in a recent experiment", "using a new microscope", "with data from the satellite",
                 "after years of research", "in the journal report")),
    "world": (("The president", "The parliament", "Diplomats", "The prime minister", "Protesters", "The ministers"),
              ("signed a treaty", "held talks", "called for elections", "closed the border", "passed a new law",
               "met the delegation"),
              ("after the summit", "amid rising tension", "during the state visit", "following the vote",
               "at the united nations")),
}


# The four extra topics of the rich corpus share some subjects / contexts with the core four ("The company"
# in money and tech, "Engineers" in science and tech, a full stadium / theatre): an 8-way task that needs
# the event words, not one giveaway subject.
NEWS_TOPICS_8 = (*NEWS_TOPICS, "tech", "arts", "weather", "crime")
_NEWS.update({
    "tech": (("The startup", "Developers", "The company", "Engineers", "The software maker", "The chip maker"),
             ("released a new app", "launched a faster chip", "fixed a security flaw", "updated its software",
              "shut down the servers", "unveiled a robot"),
             ("at the trade show", "after a data breach", "for millions of users", "ahead of the launch",
              "despite the outage")),
    "arts": (("The orchestra", "The painter", "The director", "The singer", "The museum", "The novelist"),
             ("opened an exhibition", "released a new album", "won an award", "premiered the film",
              "finished the tour", "published a novel"),
             ("at the festival", "in front of a full theatre", "after a long tour", "during the gala",
              "to great reviews")),
    "weather": (("Forecasters", "The weather service", "Residents", "Farmers", "The storm", "Meteorologists"),
                ("warned of heavy rain", "reported record heat", "expected snow", "measured strong winds",
                 "issued a flood warning", "saw the river rise"),
                ("over the weekend", "along the coast", "for the third day", "in the north",
                 "after a dry summer")),
    "crime": (("The police", "The court", "Detectives", "The judge", "The suspect", "Prosecutors"),
              ("arrested two men", "found the stolen car", "opened an investigation", "sentenced the thief",
               "charged the driver", "questioned a witness"),
              ("after the robbery", "following a long trial", "near the station", "late at night",
               "after a tip")),
})


def news(rng: Rng, topic: str) -> str:
    """A short news item; subject, event and context words reveal the topic."""
    if topic not in _NEWS:
        raise ValueError(f"unknown news topic {topic!r}; known: {NEWS_TOPICS_8}")
    subj, event, ctx = _NEWS[topic]
    city = rng.choice(CITIES)
    parts = [rng.choice((f"{city}, {rng.choice(DAYS)}.", f"Reported from {city}.", f"{city} news."))]
    for _ in range(1 + rng.randint(2)):
        parts.append(f"{rng.choice(subj)} {rng.choice(event)} {rng.choice(ctx)}.")
    if rng.chance(0.5):
        parts.append(f"{rng.choice(NAMES)} said the {rng.choice(('result', 'decision', 'news', 'report'))} "
                     f"was {rng.choice(('expected', 'a surprise', 'important', 'historic'))}.")
    return " ".join(parts)


# ---------------------------------------------------------------- recipes / how-to
INGREDIENTS = ("onion", "garlic", "rice", "flour", "butter", "tomatoes", "beans", "carrots", "eggs", "milk",
               "lentils", "spinach", "potatoes", "cheese", "lemon", "ginger", "chicken", "pasta")
ACTIONS = ("Chop", "Boil", "Stir", "Mix", "Fry", "Bake", "Slice", "Whisk", "Roast", "Simmer", "Season", "Grate")
TOOLS = ("pan", "pot", "oven", "bowl", "tray", "knife", "whisk")
TASKS_HOWTO = ("fix a flat tyre", "paint a door", "plant tomatoes", "clean a keyboard", "hang a shelf",
               "wash a wool sweater", "change a light bulb")


def recipe(rng: Rng) -> str:
    if rng.chance(0.3):
        return _howto(rng)
    dish = f"{rng.choice(INGREDIENTS)} and {rng.choice(INGREDIENTS)} {rng.choice(('soup', 'stew', 'salad', 'pie', 'curry'))}"
    lines = [f"Recipe: {dish}.", f"Serves {rng.choice(NUMBERS)}."]
    for i in range(2 + rng.randint(4)):
        lines.append(f"Step {i + 1}: {rng.choice(ACTIONS)} the {rng.choice(INGREDIENTS)} in a {rng.choice(TOOLS)} "
                     f"for {rng.choice(NUMBERS)} minutes.")
    lines.append(rng.choice(("Serve warm.", "Serve with bread.", "Keep in the fridge.", "Enjoy.")))
    return "\n".join(lines)


def _howto(rng: Rng) -> str:
    task = rng.choice(TASKS_HOWTO)
    steps = [f"How to {task}."]
    verbs = ("First", "Then", "Next", "After that", "Finally")
    for v in verbs[: 2 + rng.randint(4)]:
        steps.append(f"{v}, {rng.choice(('take', 'check', 'clean', 'remove', 'hold', 'turn'))} the "
                     f"{rng.choice(('cover', 'screw', 'wheel', 'brush', 'cloth', 'base', 'edge'))} "
                     f"{rng.choice(('carefully', 'slowly', 'with both hands', 'for a minute', 'again'))}.")
    return " ".join(steps)


# ---------------------------------------------------------------- code
VARS = ("x", "y", "n", "total", "count", "items", "value", "result", "name", "data", "size", "index")
FUNCS = ("add", "scale", "mean", "clip", "count_words", "square", "load", "merge", "reverse", "first")
OPS = ("+", "-", "*", "//")


def code(rng: Rng) -> str:
    f, a, b = rng.choice(FUNCS), rng.choice(VARS), rng.choice(VARS)
    if a == b:
        b = "other"
    lines = [f"def {f}({a}, {b}):"]
    kind = rng.randint(3)
    if kind == 0:
        lines.append(f"    return {a} {rng.choice(OPS)} {b}")
    elif kind == 1:
        lines += [f"    {rng.choice(VARS)} = 0", f"    for item in {a}:",
                  f"        if item > {b}:", "            continue", f"    return {rng.randint(10)}"]
    else:
        lines += [f"    if {a} is None:", f"        raise ValueError(\"{a} is required\")",
                  f"    return [{b} {rng.choice(OPS)} {rng.randint(9) + 1} for {b} in {a}]"]
    lines += ["", f"print({f}({rng.randint(100)}, {rng.randint(100)}))"]
    return "\n".join(lines)


# ---------------------------------------------------------------- clinical notes
SYMPTOMS = ("fever", "cough", "headache", "rash", "back pain", "fatigue", "nausea", "sore throat",
            "dizziness", "chest pain", "shortness of breath")
TREATMENTS = ("rest and fluids", "paracetamol", "a short course of antibiotics", "physiotherapy",
              "an inhaler", "a follow-up blood test", "ibuprofen")


def clinical(rng: Rng) -> str:
    age = 18 + rng.randint(70)
    sex = rng.choice(("male", "female"))
    s1, s2 = rng.choice(SYMPTOMS), rng.choice(SYMPTOMS)
    parts = [f"Patient: {age} year old {sex}.",
             f"Complaint: {s1} for {rng.choice(NUMBERS)} days" + (f", with {s2}." if s1 != s2 else "."),
             f"Temperature {36 + rng.randint(4)}.{rng.randint(10)} C, pulse {60 + rng.randint(50)}.",
             f"Plan: {rng.choice(TREATMENTS)}.",
             rng.choice(("Review in one week.", "Return if worse.", "No further action.", "Refer to specialist."))]
    return " ".join(parts)


# ---------------------------------------------------------------- dialogues
PLACES = ("the station", "the library", "the market", "the park", "the clinic", "the office", "the beach")


def dialogue(rng: Rng) -> str:
    a, b = rng.choice(NAMES), rng.choice(NAMES)
    if a == b:
        b = "Alex"
    place, day = rng.choice(PLACES), rng.choice(DAYS)
    turns = [f"{a}: Are you going to {place} on {day}?",
             f"{b}: {rng.choice(('Yes', 'No', 'Maybe', 'I think so'))}, {rng.choice(('why', 'do you need help', 'are you coming too'))}?",
             f"{a}: I need to {rng.choice(('buy some bread', 'return a book', 'meet a friend', 'see the doctor', 'drop off a parcel'))}.",
             f"{b}: {rng.choice(('Sure, I can take you', 'Let us go together', 'Sorry, I am busy', 'Call me in the morning'))}."]
    if rng.chance(0.5):
        turns.append(f"{a}: {rng.choice(('Thanks', 'Great', 'Okay', 'See you then'))}!")
    return "\n".join(turns)


def _review_doc(rng: Rng) -> str:
    return review(rng, rng.chance(0.5))


def _news_doc(rng: Rng) -> str:
    return news(rng, rng.choice(NEWS_TOPICS))


def _news8_doc(rng: Rng) -> str:
    return news(rng, rng.choice(NEWS_TOPICS_8))


DOMAINS: dict[str, Callable[[Rng], str]] = {
    "reviews": _review_doc, "news": _news_doc, "recipes": recipe,
    "code": code, "clinical": clinical, "dialogue": dialogue,
}
# corpus name -> domain generators; same domain names, the rich news domain has eight topics
CORPORA: dict[str, dict[str, Callable[[Rng], str]]] = {"core": DOMAINS, "rich": {**DOMAINS, "news": _news8_doc}}


def generate(seed: int, n_docs: int, domains: Sequence[str] | None = None, corpus: str = "core") -> list[str]:
    """`n_docs` documents, domains in round-robin order; document i depends only on (seed, i)."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {sorted(CORPORA)}")
    gens = CORPORA[corpus]
    names = list(gens) if domains is None else list(domains)
    unknown = [d for d in names if d not in gens]
    if unknown or not names:
        raise ValueError(f"unknown or empty domains {unknown or names}; known: {sorted(gens)}")
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    return [gens[names[i % len(names)]](Rng(derive_seed(seed, i))) for i in range(n_docs)]


def write_corpus(out_dir: str | Path, seed: int = 0, docs_per_domain: int = 500) -> list[Path]:
    """One `<domain>.jsonl` per domain, one {"text": document} per line: calibration text for masks.

    JSONL keeps multi-line documents (code, recipes) whole; `meerkat mask build` reads it as is.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, name in enumerate(sorted(DOMAINS)):
        docs = generate(derive_seed(seed, 1000 + k), docs_per_domain, [name])
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        paths.append(path)
    return paths
