"""Negative prompts for SDXL workers.

The legacy system sent every SDXL job a negative prompt made of a fixed base
of quality/anatomy terms plus extra groups chosen from what the positive
prompt describes: several people (and whether they are all women, all men or
mixed), and explicit anatomy.  This module reproduces that behaviour with one
important fix: words are matched as *whole words*.  The legacy substring
matching counted "woman" as "man", "female" as "male" and "manga" or
"humanity" as a person, which pushed the wrong gender terms into the negative
prompt and made SDXL drop or swap the people the user asked for.

Everything is pure and deterministic so the same prompt always yields the same
negative prompt (workers are retried; results must be reproducible).  The word
lists are module-level constants so a reviewer can read them in one place.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "BASE_NEGATIVE_TERMS",
    "MULTI_PERSON_TERMS",
    "MIXED_GENDER_TERMS",
    "FEMALE_ONLY_TERMS",
    "MALE_ONLY_TERMS",
    "EXPLICIT_TERMS",
    "FEMALE_WORDS",
    "MALE_WORDS",
    "GENDER_ADJECTIVES",
    "NEUTRAL_PERSON_WORDS",
    "IRREGULAR_PLURALS",
    "COLLECTIVE_PERSON_WORDS",
    "COUNT_WORDS",
    "COUNT_WINDOW",
    "EXPLICIT_WORDS",
    "words",
    "build_negative_prompt",
]

# --------------------------------------------------------------------------
# Output term groups, in the order they are appended.
# --------------------------------------------------------------------------

#: Always sent: generic quality and anatomy problems.
BASE_NEGATIVE_TERMS: tuple[str, ...] = (
    "lowres",
    "bad anatomy",
    "bad hands",
    "text",
    "error",
    "missing fingers",
    "extra digit",
    "fewer digits",
    "cropped",
    "worst quality",
    "low quality",
    "normal quality",
    "jpeg artifacts",
    "signature",
    "watermark",
    "username",
    "blurry",
    "deformed",
    "disfigured",
    "extra limbs",
    "mutated hands",
    "poorly drawn hands",
    "poorly drawn face",
    "mutation",
    "bad proportions",
)

#: Added whenever the prompt describes more than one person: SDXL tends to
#: melt neighbouring bodies together.
MULTI_PERSON_TERMS: tuple[str, ...] = (
    "merged bodies",
    "fused bodies",
    "fused limbs",
    "conjoined",
    "duplicate",
    "cloned face",
)

#: Several people of both genders: keep each person's gender as written.
MIXED_GENDER_TERMS: tuple[str, ...] = (
    "extra people",
    "gender swap",
    "androgynous",
)

#: Several people, only female words: keep men out of the picture.
FEMALE_ONLY_TERMS: tuple[str, ...] = (
    "extra people",
    "male",
    "man",
    "men",
    "masculine",
    "beard",
    "facial hair",
)

#: Several people, only male words: keep women out of the picture.
MALE_ONLY_TERMS: tuple[str, ...] = (
    "extra people",
    "female",
    "woman",
    "women",
    "feminine",
)

#: Explicit/anatomical prompts: anatomy fixes (not a content filter; moderation
#: happens elsewhere).
EXPLICIT_TERMS: tuple[str, ...] = (
    "deformed genitals",
    "malformed anatomy",
    "extra nipples",
    "missing nipples",
    "asymmetrical breasts",
    "bad proportions",
)

# --------------------------------------------------------------------------
# Input vocabularies (lemmas; regular plurals and possessives are derived).
# --------------------------------------------------------------------------

#: Nouns that name one female person.
FEMALE_WORDS: frozenset[str] = frozenset({
    "woman", "girl", "lady", "wife", "mother", "mom", "mum", "mommy",
    "sister", "daughter", "queen", "bride", "girlfriend", "actress",
    "princess", "duchess", "empress", "goddess", "heroine", "grandmother",
    "grandma", "granddaughter", "aunt", "niece", "stepmother", "stepdaughter",
    "businesswoman", "policewoman", "waitress", "schoolgirl", "housewife",
    "ballerina", "nun", "maid", "lass", "madam", "widow",
})

#: Nouns that name one male person.
MALE_WORDS: frozenset[str] = frozenset({
    "man", "boy", "gentleman", "husband", "father", "dad", "daddy",
    "brother", "son", "king", "groom", "bridegroom", "boyfriend", "prince",
    "duke", "emperor", "grandfather", "grandpa", "grandson",
    "uncle", "nephew", "stepfather", "stepson", "businessman", "policeman",
    "fireman", "waiter", "schoolboy", "monk", "lad", "guy", "widower",
})

#: Gender words that are usually adjectives ("female portrait"): they decide
#: the gender but a singular one does not count as an extra person.  Their
#: plurals ("females") do count as several people.
GENDER_ADJECTIVES: dict[str, str] = {
    "female": "f",
    "male": "m",
}

#: Nouns that name one person of unspecified gender.  Words that are mostly
#: used as modifiers in image prompts ("baby blue", "human skin", "god rays",
#: "hero shot", "individual strands") are deliberately left out.
NEUTRAL_PERSON_WORDS: frozenset[str] = frozenset({
    "person", "child", "kid", "toddler", "teen", "teenager", "adult",
    "friend", "student", "sibling", "twin", "parent", "partner", "spouse",
    "dancer", "athlete", "soldier", "warrior", "knight", "doctor", "nurse",
})

#: Plurals that suffix stripping cannot derive, mapped to their lemma.
IRREGULAR_PLURALS: dict[str, str] = {
    "women": "woman",
    "men": "man",
    "gentlemen": "gentleman",
    "businesswomen": "businesswoman",
    "businessmen": "businessman",
    "policewomen": "policewoman",
    "policemen": "policeman",
    "firemen": "fireman",
    "housewives": "housewife",
    "wives": "wife",
    "children": "child",
    "people": "person",
    "folk": "person",
    "folks": "person",
}

#: Nouns that by themselves mean several people ("a couple", "a crowd").
COLLECTIVE_PERSON_WORDS: frozenset[str] = frozenset({
    "couple", "crowd", "family", "twins",
})

#: Quantity words; they make "several people" only when a person word follows
#: within :data:`COUNT_WINDOW` words ("two cats and a woman" adds nothing).
COUNT_WORDS: frozenset[str] = frozenset({
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "several", "many", "multiple", "both", "pair", "trio", "group", "team",
    "dozen", "couple", "crowd",
})

#: Explicit/anatomical words (lemmas; "nudes", "breasts" derive from these).
EXPLICIT_WORDS: frozenset[str] = frozenset({
    "nude", "naked", "nudity", "topless", "breast", "nipple", "penis",
    "vagina", "vulva", "genital", "genitalia", "explicit", "nsfw",
})

#: How many words after a count word may name the people being counted
#: ("two young blonde women", "group portrait of a woman").
COUNT_WINDOW: int = 3

# --------------------------------------------------------------------------
# Tokenizer and classification.
# --------------------------------------------------------------------------

# A word is a run of letters/digits, optionally followed by an apostrophe
# part ("women's", "don't").  \b anchors keep "woman" from matching in "man".
_WORD_RE = re.compile(r"\b[^\W_]+(?:['\u2019][^\W_]+)?\b")
_POSSESSIVE_RE = re.compile(r"['\u2019]s$")

_PERSON_LEMMAS: frozenset[str] = (
    FEMALE_WORDS | MALE_WORDS | NEUTRAL_PERSON_WORDS | frozenset(GENDER_ADJECTIVES)
)


def words(text: str) -> list[str]:
    """Split ``text`` into lowercased whole words, possessives removed.

    Shared by every rule here so they all agree on what a "word" is:
    ``"Two women's hats"`` gives ``["two", "women", "hats"]``.  A trailing
    plural apostrophe ("girls'") is not part of a word, so it drops out too.
    """
    result: list[str] = []
    for match in _WORD_RE.finditer(text.lower()):
        word = _POSSESSIVE_RE.sub("", match.group(0))
        if word:
            result.append(word)
    return result


def _lemma(word: str, vocabulary: frozenset[str]) -> tuple[str, bool] | None:
    """Return ``(lemma, is_plural)`` if ``word`` is a form of a vocabulary word.

    Only simple English plurals are derived ("-s", "-es", "-ies"), which is
    enough for prompts and keeps the rules reviewable; irregular plurals are
    listed in :data:`IRREGULAR_PLURALS`.  "mens"/"womens" (a common misspelling
    of the possessive) strip to "men"/"women" and are handled as plurals.
    """
    if word in vocabulary:
        return word, False
    irregular = IRREGULAR_PLURALS.get(word)
    if irregular is not None and irregular in vocabulary:
        return irregular, True
    candidates: list[str] = []
    if word.endswith("ies") and len(word) > 4:
        candidates.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        candidates.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        candidates.append(word[:-1])
    for candidate in candidates:
        if candidate in vocabulary:
            return candidate, True
        irregular = IRREGULAR_PLURALS.get(candidate)
        if irregular is not None and irregular in vocabulary:
            return irregular, True
    return None


def _gender_of(lemma: str) -> str | None:
    """'f', 'm' or None for a person lemma."""
    if lemma in FEMALE_WORDS:
        return "f"
    if lemma in MALE_WORDS:
        return "m"
    return GENDER_ADJECTIVES.get(lemma)


def _dedupe(terms: Iterable[str]) -> list[str]:
    """Keep the first occurrence of each term so the output order is stable."""
    return list(dict.fromkeys(terms))


def build_negative_prompt(prompt: str) -> str:
    """Return the comma-separated SDXL negative prompt for ``prompt``.

    Order is fixed (base, multi-person, gender group, explicit) and repeated
    terms are dropped, so identical prompts give byte-identical negatives and
    job payloads stay cacheable/comparable.
    """
    tokens = words(prompt or "")

    person_nouns: set[str] = set()  # distinct person nouns (not adjectives)
    genders: set[str] = set()
    plural_person = False
    collective = False
    counted = False
    explicit = False
    count_positions: list[int] = []
    gender_adjective = False  # "female"/"male" seen (may qualify neutral nouns)
    ungendered_noun = False  # "child", "friend", ...: could be either gender

    for index, token in enumerate(tokens):
        if token in COUNT_WORDS:
            count_positions.append(index)
        if _lemma(token, COLLECTIVE_PERSON_WORDS) is not None:
            collective = True
        if _lemma(token, EXPLICIT_WORDS) is not None:
            explicit = True
        found = _lemma(token, _PERSON_LEMMAS)
        if found is None:
            continue
        lemma, plural = found
        if any(0 < index - at <= COUNT_WINDOW for at in count_positions):
            counted = True
        gender = _gender_of(lemma)
        if gender is not None:
            genders.add(gender)
        if plural:
            plural_person = True
        if lemma in GENDER_ADJECTIVES:
            gender_adjective = True
        else:
            person_nouns.add(lemma)
            if gender is None:
                ungendered_noun = True

    mixed = genders == {"f", "m"}
    several = (
        plural_person
        or collective
        or mixed
        or len(person_nouns) >= 2
        or counted
    )

    # Only push the other gender away when every person is known to be of
    # one gender: "mother and child" must not forbid a boy, while in "two
    # female friends" the adjective settles the neutral noun's gender.
    single_gender = not ungendered_noun or gender_adjective

    terms: list[str] = list(BASE_NEGATIVE_TERMS)
    if several:
        terms.extend(MULTI_PERSON_TERMS)
        if mixed:
            terms.extend(MIXED_GENDER_TERMS)
        elif genders == {"f"} and single_gender:
            terms.extend(FEMALE_ONLY_TERMS)
        elif genders == {"m"} and single_gender:
            terms.extend(MALE_ONLY_TERMS)
    if explicit:
        terms.extend(EXPLICIT_TERMS)
    return ", ".join(_dedupe(terms))
