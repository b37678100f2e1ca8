"""Synthetic tasks with known ground truth, shared by the demo models' training script and the tests.

    source, target, alignment = translation_example(random_source(0))
    facts()[0]            # Fact(subject='...', capital='...', language='...')

Translation: word-by-word translation from an invented SVO language ("Sral", adjectives before nouns,
prepositions) to an invented SOV language ("Oumi", adjectives after nouns, postpositions, the verb
last). Every word has exactly one translation and no word occurs twice in a sentence, so the
alignment of every target word to its source word is known:

    source  DET ADJ N1  VERB  DET N2   PREP DET N3  ADV
    target  DET' N1' ADJ' DET' N2'  DET' N3' PREP'  ADV' VERB'

Facts: a fixed set of invented countries (one or two words), each with a capital city and a
language; the LM learns "the capital of X is Y", "in X people speak L" and "Y is a city in X".

Lookup: "the code of X is Y ." sentences for a few random names X with random codes Y, then the
question "the code of X is" about one of them; the answer can only come from the context, so the
answering sentence is the ground truth of context attribution (`lookup_case`).

Everything here is deterministic: the lexicons come from a fixed seed through `random.Random.random`
only (the one method whose sequence Python keeps stable across versions), and the split between
training and held-out sentences is a CRC32 hash of the source text.
"""

from __future__ import annotations

import functools
import random
import zlib
from dataclasses import dataclass

__all__ = [
    "FACT_TEMPLATES",
    "LEXICON_SEED",
    "LOOKUP_SENTENCES",
    "POS_SIZES",
    "Fact",
    "Rng",
    "facts",
    "fact_prompt",
    "is_held_out",
    "lexicon",
    "lm_corpus",
    "lookup_case",
    "lookup_words",
    "random_source",
    "sample_translations",
    "translation_example",
    "vocabulary",
]

LEXICON_SEED = 20240607
# Words per part of speech, the same in both languages (the translation is a bijection per part of speech).
POS_SIZES = {"noun": 140, "adj": 60, "verb": 60, "adv": 20, "det": 8, "prep": 12}
HELD_OUT_PERCENT = 10  # sentences whose CRC32 % 100 falls below this are never trained on

# Syllable inventories: Sral words are consonant-heavy (ending in a consonant), Oumi words end in a vowel,
# so no word belongs to both languages.
SRAL_ONSETS = ["b", "d", "g", "k", "p", "t", "v", "z", "s", "r", "br", "dr", "gr", "kr", "st", "sk", "tr", "zv"]
SRAL_VOWELS = ["a", "e", "i", "o", "u"]
SRAL_CODAS = ["k", "t", "n", "r", "s", "z", "sk", "rn", "lt", "x"]
OUMI_ONSETS = ["m", "n", "l", "h", "y", "w", "f", "ch", "sh", "ny", "ph", "q"]
OUMI_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "ua"]

# Facts: invented place names in a third style, plus the words of the templates.
PLACE_ONSETS = ["b", "c", "d", "f", "g", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "qu"]
PLACE_VOWELS = ["a", "e", "i", "o", "u", "y", "ae", "io"]
PLACE_ENDS = ["ria", "land", "stan", "mar", "via", "nia", "dor", "gard", "ta", "lia"]
CITY_ENDS = ["burg", "ville", "polis", "grad", "ford", "ton", "mouth", "heim", "port", "by"]
COUNTRY_PREFIXES = ["north", "south", "east", "west"]
N_COUNTRIES, N_LANGUAGES, TWO_WORD_PERCENT = 120, 16, 20


class Rng:
    """A seeded generator that only uses `random.Random.random` (stable across Python versions)."""

    def __init__(self, seed):
        self._random = random.Random(seed)

    def random(self) -> float:
        return self._random.random()

    def below(self, n: int) -> int:
        return min(int(self._random.random() * n), n - 1)

    def choice(self, items):
        return items[self.below(len(items))]

    def sample(self, items, k: int) -> list:
        pool = list(items)
        return [pool.pop(self.below(len(pool))) for _ in range(k)]

    def chance(self, p: float) -> bool:
        return self._random.random() < p


# -- translation ----------------------------------------------------------------------------------


def _words(rng: Rng, count: int, make, taken: set) -> list[str]:
    out = []
    while len(out) < count:
        word = make(rng)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def _sral_word(rng: Rng) -> str:
    syllables = 1 + rng.below(2)
    return "".join(rng.choice(SRAL_ONSETS) + rng.choice(SRAL_VOWELS) for _ in range(syllables)) + rng.choice(SRAL_CODAS)


def _oumi_word(rng: Rng) -> str:
    syllables = 2 + rng.below(2)
    return "".join(rng.choice(OUMI_ONSETS) + rng.choice(OUMI_VOWELS) for _ in range(syllables))


@functools.lru_cache(maxsize=None)
def lexicon() -> dict[str, list[tuple[str, str]]]:
    """`{part of speech: [(sral word, oumi word), ...]}`, fixed by `LEXICON_SEED`."""
    rng, taken = Rng(LEXICON_SEED), set()
    return {
        pos: list(zip(_words(rng, size, _sral_word, taken), _words(rng, size, _oumi_word, taken)))
        for pos, size in POS_SIZES.items()
    }


def random_source(rng: Rng | int) -> list[tuple[str, str]]:
    """One random source sentence as `[(part of speech, index into lexicon()[pos]), ...]` groups, see
    `translation_example`. Within a sentence no word is used twice."""
    rng = rng if isinstance(rng, Rng) else Rng(rng)
    lex = lexicon()
    used: dict[str, set] = {pos: set() for pos in lex}

    def pick(pos):
        index = rng.below(len(lex[pos]))
        while index in used[pos]:
            index = rng.below(len(lex[pos]))
        used[pos].add(index)
        return index

    def noun_phrase():
        phrase = []
        if rng.chance(0.6):
            phrase.append(("det", pick("det")))
        if rng.chance(0.5):
            phrase.append(("adj", pick("adj")))
        phrase.append(("noun", pick("noun")))
        return phrase

    sentence = {"subject": noun_phrase(), "verb": [("verb", pick("verb"))]}
    if rng.chance(0.6):
        sentence["object"] = noun_phrase()
    if rng.chance(0.4):
        sentence["pp"] = [("prep", pick("prep"))] + noun_phrase()
    if rng.chance(0.3):
        sentence["adv"] = [("adv", pick("adv"))]
    return sentence


def _oumi_noun_phrase(phrase):
    """Sral `[DET] [ADJ] N` -> Oumi `[DET] N [ADJ]` (also for a PP's NP; the preposition goes last)."""
    det = [w for w in phrase if w[0] == "det"]
    adj = [w for w in phrase if w[0] == "adj"]
    noun = [w for w in phrase if w[0] == "noun"]
    prep = [w for w in phrase if w[0] == "prep"]
    return det + noun + adj + prep


def translation_example(sentence) -> tuple[str, str, list[tuple[int, int]]]:
    """`(source, target, alignment)` for a sentence from `random_source`; alignment pairs are
    (target word index, source word index), one per target word."""
    lex = lexicon()
    source = [w for part in ("subject", "verb", "object", "pp", "adv") for w in sentence.get(part, [])]
    target = [
        w
        for part in ("subject", "object", "pp", "adv", "verb")
        for w in (
            _oumi_noun_phrase(sentence.get(part, [])) if part in ("subject", "object", "pp") else sentence.get(part, [])
        )
    ]
    position = {w: i for i, w in enumerate(source)}
    alignment = [(j, position[w]) for j, w in enumerate(target)]
    return (
        " ".join(lex[pos][i][0] for pos, i in source),
        " ".join(lex[pos][i][1] for pos, i in target),
        alignment,
    )


def is_held_out(source: str) -> bool:
    """Held-out sentences are never trained on (a fixed ~10% of all possible sentences)."""
    return zlib.crc32(source.encode()) % 100 < HELD_OUT_PERCENT


def sample_translations(n: int, seed: int, held_out: bool = False) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """`n` random `(source, target, alignment)` triples from the training split, or from the held-out one."""
    rng, out = Rng(f"translation-{seed}"), []
    while len(out) < n:
        example = translation_example(random_source(rng))
        if is_held_out(example[0]) == held_out:
            out.append(example)
    return out


# -- facts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    subject: str  # the country, one or two words
    capital: str  # one word
    language: str  # one word


def _place(rng: Rng, ends) -> str:
    stem = "".join(rng.choice(PLACE_ONSETS) + rng.choice(PLACE_VOWELS) for _ in range(1 + rng.below(2)))
    return stem + rng.choice(ends)


@functools.lru_cache(maxsize=None)
def facts() -> tuple[Fact, ...]:
    """The fixed set of facts the demo LM is trained on. Some countries are two words, e.g. "north X"
    next to "X": then the capital depends on both words."""
    rng, taken = (
        Rng(f"{LEXICON_SEED}-facts"),
        set(COUNTRY_PREFIXES) | {"the", "capital", "of", "is", "a", "city", "in", "people", "speak"},
    )
    languages = _words(rng, N_LANGUAGES, lambda r: _place(r, ["ish", "ese", "ic", "an", "i"]), taken)
    countries: list[str] = []
    while len(countries) < N_COUNTRIES:
        if countries and rng.below(100) < TWO_WORD_PERCENT:
            name = rng.choice(COUNTRY_PREFIXES) + " " + rng.choice([c for c in countries if " " not in c])
            if name in taken:
                continue
            taken.add(name)
        else:
            name = _words(rng, 1, lambda r: _place(r, PLACE_ENDS), taken)[0]
        countries.append(name)
    capitals = _words(rng, N_COUNTRIES, lambda r: _place(r, CITY_ENDS), taken)
    return tuple(Fact(c, y, rng.choice(languages)) for c, y in zip(countries, capitals))


# The LM's templates, (prompt, answer) per fact. Only the capital template has the shape "the ... of X
# is": were the language asked as "the language of X is", the relation word would decide the answer as
# much as the subject does, and attributions would rightly split between them.
FACT_TEMPLATES = {
    "capital": lambda f: (f"the capital of {f.subject} is", f.capital),
    "language": lambda f: (f"in {f.subject} people speak", f.language),
    "city_in": lambda f: (f"{f.capital} is a city in", f.subject),
}


def fact_prompt(fact: Fact) -> tuple[str, str]:
    """`("the capital of X is", "Y")`."""
    return FACT_TEMPLATES["capital"](fact)


def lm_corpus() -> list[str]:
    """Every training sentence of the demo LM (without the EOS the training script appends)."""
    return [" ".join(template(fact)) for fact in facts() for template in FACT_TEMPLATES.values()]


# -- in-context lookup ------------------------------------------------------------------------------

N_LOOKUP_NAMES, N_LOOKUP_CODES = 40, 40
LOOKUP_SENTENCES = (3, 6)  # sentences per context, both included
NAME_ENDS = ["o", "a", "i", "en", "el", "ix"]
DIGITS = "0123456789"


@functools.lru_cache(maxsize=None)
def lookup_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`(names, codes)` of the lookup task: invented one-word names ("kelo") and codes ("ba47"), no word
    shared with the facts."""
    rng = Rng(f"{LEXICON_SEED}-lookup")
    taken = {w for s in lm_corpus() for w in s.split()}
    names = _words(
        rng, N_LOOKUP_NAMES, lambda r: r.choice(PLACE_ONSETS) + r.choice(PLACE_VOWELS) + r.choice(NAME_ENDS), taken
    )
    codes = _words(
        rng,
        N_LOOKUP_CODES,
        lambda r: r.choice(PLACE_ONSETS) + r.choice(SRAL_VOWELS) + r.choice(DIGITS) + r.choice(DIGITS),
        taken,
    )
    return tuple(names), tuple(codes)


def lookup_case(rng: Rng | int) -> tuple[list[str], str, str, int]:
    """One fresh lookup case `(sentences, question, answer, index)`, e.g.
    `(["the code of kelo is ba44 .", "the code of mira is tu11 ."], "the code of mira is", "tu11", 1)`:
    3 to 6 sentences with distinct random names and codes, the question about sentence `index`.
    The context is `" ".join(sentences)`; the model's input `f"{context} {question}"`."""
    rng = rng if isinstance(rng, Rng) else Rng(f"lookup-{rng}")
    names, codes = lookup_words()
    n = LOOKUP_SENTENCES[0] + rng.below(LOOKUP_SENTENCES[1] - LOOKUP_SENTENCES[0] + 1)
    chosen_names, chosen_codes = rng.sample(names, n), rng.sample(codes, n)
    index = rng.below(n)
    sentences = [f"the code of {name} is {code} ." for name, code in zip(chosen_names, chosen_codes)]
    return sentences, f"the code of {chosen_names[index]} is", chosen_codes[index], index


# -- vocabularies -------------------------------------------------------------------------------------


def vocabulary(task: str) -> list[str]:
    """The words of the demo models' word-level tokenizers (special tokens not included)."""
    if task == "mt":
        return [w for pairs in lexicon().values() for pair in pairs for w in pair]
    if task == "lm":
        seen: dict[str, None] = {}
        for sentence in lm_corpus():
            seen.update(dict.fromkeys(sentence.split()))
        names, codes = lookup_words()
        seen.update(dict.fromkeys(["code", ".", *names, *codes]))
        return list(seen)
    raise ValueError(f"Unknown task {task!r}; expected 'mt' or 'lm'")
