"""A bank of short-answer questions written here, for the real-model task (`make run-real`).

    bank = question_bank()                          # every question, in a fixed order
    train, held_out = split_by_fact(kept, held_out_frac=0.4, seed=0)

Nine families, each a template over facts written below: capitals of countries, the language
spoken in a country, opposites, plurals, colours of things, single-digit sums, the number after
N, counts ("How many legs does a spider have?") and general facts. Every question carries its
accepted answers and its rivals (the other answers of its family that an answer must not name;
eopd_ray/evaluation/short_answer.py). Numbers are accepted as digits or words.

Which questions make the task is decided by the teacher: jobs/real_task.py prepare keeps those
it answers correctly. Training and held-out questions are split by FACT within each family, so
no held-out fact is asked during training. Pure Python: imports neither torch nor any engine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from eopd_ray.evaluation.short_answer import ShortAnswer

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip


def number_answers(n: int) -> tuple[str, ...]:
    """The digits and the word (up to twenty): 7 -> ("7", "seven")."""
    return (str(n), NUMBER_WORDS[n]) if 0 <= n < len(NUMBER_WORDS) else (str(n),)


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo",
    "England": "London", "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi",
    "Brazil": "Brasilia", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Hungary": "Budapest", "the Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Switzerland": "Bern", "Turkey": "Ankara", "Kenya": "Nairobi",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Indonesia": "Jakarta", "Vietnam": "Hanoi",
    "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "the Philippines": "Manila", "the Czech Republic": "Prague",
    "Scotland": "Edinburgh", "Colombia": "Bogota", "Ukraine": "Kyiv", "Syria": "Damascus",
}  # fmt: skip
# Also accepted: other spellings of the same city.
CAPITAL_SPELLINGS = {"New Delhi": ("Delhi",), "Kyiv": ("Kiev",), "Bern": ("Berne",)}

LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish",
    "Japan": "Japanese", "China": ("Chinese", "Mandarin"), "Russia": "Russian",
    "Brazil": "Portuguese", "Portugal": "Portuguese", "Mexico": "Spanish", "Greece": "Greek",
    "Egypt": "Arabic", "Turkey": "Turkish", "Poland": "Polish", "Sweden": "Swedish",
    "the Netherlands": "Dutch", "South Korea": "Korean", "Vietnam": "Vietnamese",
    "Thailand": "Thai", "England": "English", "Israel": "Hebrew", "Iran": ("Persian", "Farsi"),
    "Finland": "Finnish", "Norway": "Norwegian", "Denmark": "Danish", "Hungary": "Hungarian",
    "Argentina": "Spanish", "Australia": "English",
}  # fmt: skip

OPPOSITES = {
    "hot": "cold", "big": ("small", "little"), "up": "down", "day": "night", "fast": "slow",
    "happy": "sad", "tall": "short", "open": ("closed", "shut"), "wet": "dry",
    "full": "empty", "high": "low", "rich": "poor", "early": "late", "good": ("bad", "evil"),
    "left": "right", "strong": "weak", "loud": ("quiet", "soft"), "thick": "thin",
    "push": "pull", "win": "lose", "love": "hate", "black": "white", "true": "false",
    "yes": "no", "first": "last", "clean": "dirty", "cheap": "expensive", "near": "far",
    "inside": "outside", "above": "below", "north": "south", "east": "west",
    "alive": "dead", "buy": "sell", "laugh": "cry", "young": "old", "light": ("dark", "heavy"),
    "hard": ("soft", "easy"), "front": "back", "question": "answer", "give": "take",
    "come": "go", "summer": "winter", "boy": "girl", "king": "queen", "entrance": "exit",
}  # fmt: skip

PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "ox": "oxen", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies",
    "bus": "buses", "potato": "potatoes", "wife": "wives", "life": "lives", "half": "halves",
    "church": "churches", "cactus": ("cacti", "cactuses"), "dog": "dogs", "book": "books",
}  # fmt: skip

COLOURS = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
    "blood": "red", "coal": "black", "a ripe tomato": "red", "a carrot": "orange",
    "a lemon": "yellow", "chocolate": "brown", "milk": "white", "an emerald": "green",
    "a strawberry": "red", "a lime": "green", "a polar bear": "white", "a crow": "black",
    "an elephant": ("grey", "gray"), "a pumpkin": "orange", "a frog": "green",
    "a fire truck": "red", "a school bus": "yellow", "the ocean": "blue", "a cherry": "red",
    "a blueberry": "blue", "a pig": "pink", "a flamingo": "pink", "a raven": "black",
    "an eggplant": "purple", "a lettuce": "green", "a cloud": ("white", "grey", "gray"),
}  # fmt: skip
COLOUR_WORDS = (
    "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black",
    "white", "grey", "gray", "silver", "gold",
)  # fmt: skip

COUNTS = {
    "How many legs does a spider have?": 8, "How many legs does a dog have?": 4,
    "How many legs does a bird have?": 2, "How many legs does an insect have?": 6,
    "How many days are in a week?": 7, "How many months are in a year?": 12,
    "How many hours are in a day?": 24, "How many minutes are in an hour?": 60,
    "How many seconds are in a minute?": 60, "How many sides does a triangle have?": 3,
    "How many sides does a square have?": 4, "How many sides does a hexagon have?": 6,
    "How many sides does an octagon have?": 8, "How many wheels does a bicycle have?": 2,
    "How many wheels does a tricycle have?": 3, "How many wheels does a car have?": 4,
    "How many continents are there?": 7, "How many planets are in the solar system?": 8,
    "How many days are in a year?": 365, "How many players are on a soccer team?": 11,
    "How many arms does an octopus have?": 8, "How many eyes does a person have?": 2,
    "How many fingers are on one hand?": 5, "How many cents are in a dollar?": 100,
    "How many years are in a century?": 100, "How many strings does a violin have?": 4,
}  # fmt: skip

FACTS = {
    "What do bees make?": "honey", "What is frozen water called?": "ice",
    "Which planet do we live on?": "Earth",
    "Which animal is known as the king of the jungle?": "lion",
    "What is the largest ocean on Earth?": "Pacific",
    "Who wrote Romeo and Juliet?": "Shakespeare",
    "What is the largest planet in the solar system?": "Jupiter",
    "What is the fastest land animal?": "cheetah",
    "What is the tallest animal in the world?": "giraffe",
    "Which planet is known as the Red Planet?": "Mars",
    "What do caterpillars turn into?": ("butterfly", "butterflies", "moth"),
    "What is a baby dog called?": ("puppy", "pup"), "What is a baby cat called?": "kitten",
    "What is a baby cow called?": "calf", "What is a baby sheep called?": "lamb",
    "Which gas do humans need to breathe to stay alive?": "oxygen",
    "At what temperature in degrees Celsius does water boil?": "100",
    "Which musical instrument has 88 keys?": "piano",
    "Who painted the Mona Lisa?": ("Leonardo", "da Vinci"),
    "What is the currency of Japan?": "yen",
    "What is the currency of the United States?": "dollar",
    "What do you call a house made of ice blocks?": "igloo",
    "Which animal has a trunk?": "elephant", "What is the largest hot desert?": "Sahara",
    "Who was the first president of the United States?": "Washington",
    "What is the chemical formula of water?": "H2O",
    "What is the closest star to Earth?": "Sun",
    "Which animal is known for carrying its house on its back?": ("snail", "turtle", "tortoise"),
    "What do you call a person who flies an airplane?": "pilot",
    "What do you call a doctor for animals?": ("vet", "veterinarian"),
    "What is the main ingredient of guacamole?": "avocado",
    "Which bird is a symbol of peace?": "dove",
}  # fmt: skip


def _tuple(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return value if isinstance(value, tuple) else (value,)


def _family(
    family: str, template: str, facts: dict, rivals: Sequence[str] | None = None
) -> list[ShortAnswer]:
    """One question per fact; the rivals default to every other fact's answers."""
    every = [a for answer in facts.values() for a in _tuple(answer)]
    out = []
    for key, answer in facts.items():
        answers = _tuple(answer)
        pool = every if rivals is None else rivals
        others = tuple(dict.fromkeys(r for r in pool if r not in answers))
        out.append(ShortAnswer(template.format(key), answers, others, family, key))
    return out


def _numbers_around(answers: tuple[str, ...], asked: Sequence[int] = ()) -> tuple[str, ...]:
    """Every number 0..20 (digits and words) and the round ones, but the answer and the numbers
    the question itself names (`asked`, both spellings: restating "3 + 4" as "three plus four"
    is fine); not the word "one" ("one of the", "no one": too common to mean a number)."""
    pool = [s for n in range(21) for s in number_answers(n)] + ["60", "100", "365"]
    skip = {*answers, "one", *(s for n in asked for s in number_answers(n))}
    return tuple(dict.fromkeys(s for s in pool if s not in skip))


def question_bank() -> list[ShortAnswer]:
    """Every question of the bank, in a fixed order (families as listed in the docstring)."""
    capitals = {k: (v, *CAPITAL_SPELLINGS.get(v, ())) for k, v in CAPITALS.items()}
    bank = _family("capital", "What is the capital of {}?", capitals)
    bank += _family("language", "What language is spoken in {}?", LANGUAGES)
    bank += _family("opposite", "What is the opposite of {}?", OPPOSITES, rivals=())
    bank += _family("plural", "What is the plural of {}?", PLURALS, rivals=())
    bank += _family("colour", "What color is {}?", COLOURS, rivals=COLOUR_WORDS)
    for a in range(1, 10):
        for b in range(a, 10):
            answers = number_answers(a + b)
            rivals = _numbers_around(answers, asked=(a, b))
            bank.append(ShortAnswer(f"What is {a} + {b}?", answers, rivals, "sum", f"{a}+{b}"))
    for n in range(1, 20):
        answers = number_answers(n + 1)
        rivals = _numbers_around(answers, asked=(n,))
        bank.append(ShortAnswer(f"What number comes after {n}?", answers, rivals, "next", str(n)))
    for prompt, n in COUNTS.items():
        answers = number_answers(n)
        bank.append(ShortAnswer(prompt, answers, _numbers_around(answers), "count", prompt))
    for prompt, answer in FACTS.items():
        bank.append(ShortAnswer(prompt, _tuple(answer), (), "fact", prompt))
    return bank


def split_by_fact(
    questions: Sequence[ShortAnswer], held_out_frac: float, seed: int
) -> tuple[list[ShortAnswer], list[ShortAnswer]]:
    """(train, held_out): within each family, round(held_out_frac x its facts) facts (at least
    one when the family has two or more) are held out, chosen with `seed`; every question about
    a held-out fact goes to held_out. Orders follow `questions`."""
    if not 0 < held_out_frac < 1:
        raise ValueError(f"held_out_frac must be in (0, 1), got {held_out_frac}")
    facts: dict[str, list[str]] = {}
    for q in questions:
        seen = facts.setdefault(q.family, [])
        if q.fact not in seen:
            seen.append(q.fact)
    rng = random.Random(seed)
    held: set[tuple[str, str]] = set()
    for family, keys in facts.items():
        count = round(held_out_frac * len(keys))
        count = min(len(keys) - 1, max(1, count)) if len(keys) > 1 else 0
        held |= {(family, k) for k in rng.sample(keys, count)}
    train = [q for q in questions if (q.family, q.fact) not in held]
    held_out = [q for q in questions if (q.family, q.fact) in held]
    return train, held_out
