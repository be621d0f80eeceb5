"""Whole-word negative prompt rules (orchestrator.prompts)."""
from __future__ import annotations

import pytest

from orchestrator.prompts import (
    BASE_NEGATIVE_TERMS,
    EXPLICIT_TERMS,
    FEMALE_ONLY_TERMS,
    MALE_ONLY_TERMS,
    MIXED_GENDER_TERMS,
    MULTI_PERSON_TERMS,
    build_negative_prompt,
    words,
)


def terms(prompt: str) -> list[str]:
    return build_negative_prompt(prompt).split(", ")


def has_group(result: list[str], group: tuple[str, ...]) -> bool:
    return all(term in result for term in group)


def test_words_lowercases_and_strips_possessives() -> None:
    assert words("Two WOMEN's hats, a man's Dog; girls' bikes") == [
        "two", "women", "hats", "a", "man", "dog", "girls", "bikes",
    ]


def test_words_does_not_split_inside_words() -> None:
    assert words("woman humanity manga Manhattan") == ["woman", "humanity", "manga", "manhattan"]


def test_base_always_present_and_first() -> None:
    for prompt in ("", "a red apple", "two women", "nude man and woman"):
        result = terms(prompt)
        assert result[: len(BASE_NEGATIVE_TERMS)] == list(BASE_NEGATIVE_TERMS)


def test_empty_and_object_prompts_get_only_base() -> None:
    assert terms("") == list(BASE_NEGATIVE_TERMS)
    assert terms("two red apples on a table") == list(BASE_NEGATIVE_TERMS)


@pytest.mark.parametrize("prompt", ["a woman", "portrait of a Woman, smiling", "a woman's face"])
def test_single_woman_is_not_a_man(prompt: str) -> None:
    result = terms(prompt)
    assert result == list(BASE_NEGATIVE_TERMS)
    assert "male" not in result and "men" not in result


def test_female_portrait_is_not_male() -> None:
    assert terms("female portrait, studio light") == list(BASE_NEGATIVE_TERMS)
    assert "female" not in terms("female portrait")


@pytest.mark.parametrize(
    "prompt", ["manga style city", "humanity's future", "Manhattan skyline at night", "a mandolin"]
)
def test_words_containing_man_are_not_people(prompt: str) -> None:
    assert terms(prompt) == list(BASE_NEGATIVE_TERMS)


@pytest.mark.parametrize(
    "prompt",
    ["two women", "Two Women walking", "a woman and her daughter", "three girls at the beach",
     "womens football team", "a group of female friends"],
)
def test_several_women_get_female_only_terms(prompt: str) -> None:
    result = terms(prompt)
    assert has_group(result, MULTI_PERSON_TERMS)
    assert has_group(result, FEMALE_ONLY_TERMS)
    assert "male" in result and "masculine" in result
    assert "gender swap" not in result
    assert "feminine" not in result


@pytest.mark.parametrize("prompt", ["two men", "a father and his son", "men's choir", "three boys"])
def test_several_men_get_male_only_terms(prompt: str) -> None:
    result = terms(prompt)
    assert has_group(result, MULTI_PERSON_TERMS)
    assert has_group(result, MALE_ONLY_TERMS)
    assert "masculine" not in result and "gender swap" not in result


@pytest.mark.parametrize(
    "prompt", ["a man and a woman", "A Woman and a MAN dancing", "a male and a female knight",
               "couple: husband and wife"],
)
def test_mixed_gender(prompt: str) -> None:
    result = terms(prompt)
    assert has_group(result, MULTI_PERSON_TERMS)
    assert has_group(result, MIXED_GENDER_TERMS)
    assert "masculine" not in result and "feminine" not in result


def test_single_man_adds_nothing() -> None:
    assert terms("a man's portrait, a man") == list(BASE_NEGATIVE_TERMS)


@pytest.mark.parametrize("prompt", ["a crowd of people", "mother and child", "two men and their kids"])
def test_group_with_ungendered_people_gets_only_multi_person_terms(prompt: str) -> None:
    assert terms(prompt) == list(BASE_NEGATIVE_TERMS) + list(MULTI_PERSON_TERMS)


def test_count_word_far_from_person_is_not_a_group() -> None:
    assert terms("two cats sleeping next to a woman") == list(BASE_NEGATIVE_TERMS)


@pytest.mark.parametrize("prompt", ["nude statue", "Nude", "NUDES", "naked", "nsfw art", "bare breasts"])
def test_explicit_words_add_anatomy_terms(prompt: str) -> None:
    assert has_group(terms(prompt), EXPLICIT_TERMS)


@pytest.mark.parametrize("prompt", ["denude forest", "nudeness", "explicitly stated", "a breastplate"])
def test_explicit_match_is_whole_word(prompt: str) -> None:
    assert not any(term in terms(prompt) for term in EXPLICIT_TERMS if term not in BASE_NEGATIVE_TERMS)


def test_no_duplicates_and_stable_order() -> None:
    prompt = "two nude women and a man, women, women"
    result = terms(prompt)
    assert len(result) == len(set(result))
    assert build_negative_prompt(prompt) == build_negative_prompt(prompt)
    # groups appear in fixed order: base, multi, gender, explicit
    assert result.index("merged bodies") < result.index("gender swap") < result.index("deformed genitals")


def test_output_is_comma_separated_without_blank_terms() -> None:
    result = build_negative_prompt("two women")
    assert ", ," not in result and not result.endswith(",")
    assert all(term.strip() == term and term for term in result.split(", "))
