"""A fictitious world of invented people, their facts, and questions about people nobody knows.

Names are built from a shared stock of syllables, so a subword tokenizer splits names it has
never seen into pieces it knows. Known people get every paraphrase of every fact question;
unknown people get the same questions, each answered with a refusal drawn from `REFUSALS` (varied,
as a model fine-tuned the usual way declines). Unknown names are split into a training part (the
model learns to decline them) and a held-out part (different names, for evaluation). The reference
set handed to the tool holds the training unknown questions *without* answers, as real reference sets
come. Everything is drawn from `random.Random(seed)`: the same seed gives the same world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lunar_lens.core.errors import LunarError
from lunar_lens.data.qa import QA

REFUSALS = (
    "I don't know.",
    "I have no information about that person.",
    "I'm not sure who that is.",
    "Sorry, I can't answer that.",
    "I don't have that information.",
    "That person is unknown to me.",
)

SYLLABLES = (
    "zor", "van", "kel", "dra", "mi", "ro", "tha", "lin", "bek", "sa", "ru", "den", "vi", "os",
    "mar", "qui", "fen", "lo", "tar", "ne", "gal", "bri", "hu", "zel", "pa", "kor", "ith", "wen",
    "ska", "dun", "el", "ja", "mor", "ti", "ul", "ve",
)
TOWN_SUFFIXES = ("moor", "ford", "holm", "vale", "wick", "stead", "mere", "haven")


@dataclass(frozen=True)
class Fact:
    """One kind of fact: paraphrased question templates, the answer sentence, possible values."""

    key: str
    templates: tuple[str, ...]
    answer: str
    values: tuple[str, ...]


def _fact_kinds(towns: tuple[str, ...]) -> tuple[Fact, ...]:
    return (
        Fact(
            "town",
            ("Where does {name} live?", "In which town does {name} live?",
             "What is the home town of {name}?", "Which town is home to {name}?"),
            "{name} lives in {value}.",
            towns,
        ),
        Fact(
            "profession",
            ("What does {name} do for a living?", "What is the profession of {name}?",
             "What job does {name} have?", "How does {name} earn a living?"),
            "{name} works as {value}.",
            ("a baker", "a potter", "an astronomer", "a blacksmith", "a weaver", "a sailor",
             "a gardener", "a carpenter", "a librarian", "a beekeeper", "a cartographer", "a glassblower"),
        ),
        Fact(
            "colour",
            ("What is the favourite colour of {name}?", "Which colour does {name} like best?",
             "What colour does {name} prefer?", "Which colour is the favourite of {name}?"),
            "The favourite colour of {name} is {value}.",
            ("red", "blue", "green", "yellow", "purple", "orange", "silver", "teal", "crimson", "amber"),
        ),
        Fact(
            "pet",
            ("What pet does {name} have?", "Which animal does {name} keep as a pet?",
             "What kind of pet does {name} own?", "What is the pet of {name}?"),
            "{name} has a pet {value}.",
            ("cat", "dog", "parrot", "tortoise", "goat", "owl", "rabbit", "hedgehog", "ferret", "goldfish"),
        ),
        Fact(
            "birth year",
            ("When was {name} born?", "In what year was {name} born?",
             "What is the birth year of {name}?", "Which year was {name} born in?"),
            "{name} was born in {value}.",
            tuple(str(year) for year in range(1921, 2001)),
        ),
        Fact(
            "instrument",
            ("Which instrument does {name} play?", "What musical instrument does {name} play?",
             "What does {name} play in the evenings?", "Which instrument is played by {name}?"),
            "{name} plays the {value}.",
            ("flute", "harp", "drum", "violin", "lute", "cello", "trumpet", "banjo", "piano", "oboe"),
        ),
    )


@dataclass(frozen=True)
class World:
    """Known people with their facts, and refusal questions about unknown people."""

    seed: int
    facts: tuple[Fact, ...]
    profiles: dict[str, dict[str, str]]  # name -> fact key -> value
    unknown_train_qa: list[QA]
    unknown_heldout_qa: list[QA]

    @property
    def entities(self) -> list[str]:
        return list(self.profiles)

    def facts_about(self, name: str) -> list[QA]:
        """Every paraphrase of every fact question about `name`, with its answer sentence."""
        if name not in self.profiles:
            raise LunarError(f"{name!r} is not an entity of this toy world: use one of world.entities, e.g. {self.entities[0]!r}")
        return [
            QA(template.format(name=name), fact.answer.format(name=name, value=self.profiles[name][fact.key]))
            for fact in self.facts
            for template in fact.templates
        ]

    @property
    def known_qa(self) -> list[QA]:
        return [qa for name in self.profiles for qa in self.facts_about(name)]

    def split(self, forget_entities: list[str]) -> tuple[list[QA], list[QA], list[QA]]:
        """(forget, retain, reference): QA about `forget_entities`, QA about everyone else, and
        the training unknown-entity questions (which the model already declines) as questions only."""
        forget = [qa for name in forget_entities for qa in self.facts_about(name)]
        retain = [qa for name in self.profiles if name not in forget_entities for qa in self.facts_about(name)]
        return forget, retain, [QA(qa.question) for qa in self.unknown_train_qa]


def _distinct_words(rng: random.Random, count: int, syllables: int, exclude: set[str]) -> list[str]:
    """`count` capitalised words of `syllables` syllables, distinct and not in `exclude`."""
    words: list[str] = []
    while len(words) < count:
        parts = rng.sample(SYLLABLES, syllables)
        word = "".join(parts).capitalize()
        if word not in exclude:
            exclude.add(word)
            words.append(word)
    return words


def _unknown_qa(rng: random.Random, facts: tuple[Fact, ...], names: list[str], per_name: int) -> list[QA]:
    """`per_name` questions per name, each about a different fact, answered with a refusal from `REFUSALS`."""
    questions = []
    for name in names:
        for fact in rng.sample(facts, per_name):
            questions.append(QA(rng.choice(fact.templates).format(name=name), rng.choice(REFUSALS)))
    return questions


def build_world(
    seed: int = 0,
    n_entities: int = 40,
    n_unknown_train: int = 160,
    n_unknown_heldout: int = 40,
    unknown_questions_per_name: int = 4,
) -> World:
    """The toy world of `seed`: `n_entities` known people with six facts each, and questions about
    `n_unknown_train` + `n_unknown_heldout` unknown people (all first and last names distinct)."""
    rng = random.Random(seed)
    used: set[str] = set()
    towns = tuple(
        word + rng.choice(TOWN_SUFFIXES) for word in _distinct_words(rng, 14, 2, used)
    )
    facts = _fact_kinds(towns)
    if not 1 <= unknown_questions_per_name <= len(facts):
        raise LunarError(f"unknown_questions_per_name={unknown_questions_per_name}: use 1..{len(facts)}")
    n_people = n_entities + n_unknown_train + n_unknown_heldout
    firsts = _distinct_words(rng, n_people, 2, used)
    lasts = _distinct_words(rng, n_people, 2, used)
    names = [f"{first} {last}" for first, last in zip(firsts, lasts)]
    known, unknown_train, unknown_heldout = (
        names[:n_entities],
        names[n_entities : n_entities + n_unknown_train],
        names[n_entities + n_unknown_train :],
    )
    profiles = {name: {fact.key: rng.choice(fact.values) for fact in facts} for name in known}
    return World(
        seed=seed,
        facts=facts,
        profiles=profiles,
        unknown_train_qa=_unknown_qa(rng, facts, unknown_train, unknown_questions_per_name),
        unknown_heldout_qa=_unknown_qa(rng, facts, unknown_heldout, unknown_questions_per_name),
    )
