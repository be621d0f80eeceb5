"""Behaviour of the rule-based prompt enhancer and the backend factory."""
from __future__ import annotations

import re

import pytest

from orchestrator.enhancer import (
    MAX_PROMPT_CHARS,
    Enhancement,
    PromptEnhancer,
    RuleBasedEnhancer,
    get_enhancer,
)

PROMPT = "a lighthouse on a rocky cliff during a storm"


def enhance(prompt: str, format: str = "image", quality: str = "fast") -> Enhancement:
    return RuleBasedEnhancer().enhance(prompt, format=format, quality=quality)


def added_terms(result: Enhancement) -> list[str]:
    """The descriptors appended after the (tidied) original prompt."""
    tail = result.prompt[len(" ".join(result.original.split())):]
    return [t.strip().lower() for t in tail.strip(" ,.").split(",") if t.strip()]


def count_word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{word}\b", text, flags=re.IGNORECASE))


def test_factory_builds_rules_backend_and_rejects_unknown_names() -> None:
    enhancer: PromptEnhancer = get_enhancer()
    assert isinstance(enhancer, RuleBasedEnhancer) and enhancer.name == "rules"
    assert isinstance(get_enhancer("rules"), RuleBasedEnhancer)
    with pytest.raises(ValueError):
        get_enhancer("gpt")


def test_enhancement_keeps_the_prompt_and_appends_descriptors() -> None:
    result = enhance(PROMPT)
    assert result.original == PROMPT and result.backend == "rules" and result.error is None
    assert result.prompt.startswith("A lighthouse on a rocky cliff during a storm, ")
    assert len(added_terms(result)) >= 3


def test_enhancement_is_deterministic() -> None:
    assert enhance(PROMPT, "video", "high") == enhance(PROMPT, "video", "high")
    assert get_enhancer().enhance(PROMPT, format="image", quality="fast") == enhance(PROMPT)


def test_whitespace_is_normalised_and_start_capitalised() -> None:
    result = enhance("  a   cat \n on\ta mat ,  ")
    assert result.prompt.startswith("A cat on a mat, ")
    assert "  " not in result.prompt and "\n" not in result.prompt
    assert enhance("iPhone on a desk").prompt.startswith("iPhone on a desk, ")


def test_video_and_image_descriptors_differ() -> None:
    image, video = added_terms(enhance(PROMPT, "image")), added_terms(enhance(PROMPT, "video"))
    assert set(image) != set(video)
    assert any("motion" in t for t in video) and not any("motion" in t for t in image)
    assert any("camera" in t for t in video)
    assert any("composition" in t for t in image)


def test_high_quality_adds_more_descriptors() -> None:
    for format in ("image", "video"):
        fast, high = added_terms(enhance(PROMPT, format)), added_terms(enhance(PROMPT, format, "high"))
        assert len(high) > len(fast)
        assert high[: len(fast)] == fast


@pytest.mark.parametrize("format", ["image", "video"])
def test_existing_words_are_not_duplicated(format: str) -> None:
    result = enhance("A CINEMATIC view of Paris, highly detailed", format, "high")
    assert count_word(result.prompt, "cinematic") == 1
    assert count_word(result.prompt, "detailed") == 1
    assert "cinematic lighting" not in result.prompt.lower()


def test_no_word_of_any_descriptor_appears_twice() -> None:
    for format in ("image", "video"):
        for quality in ("fast", "high"):
            terms = added_terms(enhance(PROMPT, format, quality))
            words = [w for t in terms for w in t.split()]
            meaningful = [w for w in words if w not in {"high", "natural"}]
            assert len(meaningful) == len(set(meaningful)), terms


def test_match_is_whole_word() -> None:
    # "motionless" is not "motion": the motion descriptor is still added.
    result = enhance("a motionless lake at dawn", "video")
    assert "smooth natural motion" in result.prompt


def test_sentence_prompt_gets_descriptors_as_a_new_sentence() -> None:
    result = enhance("A fox sleeps in the snow.")
    assert result.prompt.startswith("A fox sleeps in the snow. Highly detailed, ")
    assert result.prompt.endswith(".") and ".," not in result.prompt


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_prompt_reports_error_and_keeps_original(prompt: str) -> None:
    result = enhance(prompt)
    assert result.error and result.prompt == prompt and result.original == prompt


def test_long_prompts_get_fewer_terms_and_stay_bounded() -> None:
    short = added_terms(enhance(PROMPT, "image", "high"))
    long_prompt = " ".join(["a quiet harbour town with fishing boats"] * 12)
    long = enhance(long_prompt, "image", "high")
    assert 1 <= len(added_terms(long)) < len(short)
    assert len(long.prompt) <= MAX_PROMPT_CHARS
    near_limit = "word " * 198  # 990 characters: no room for most descriptors
    assert len(enhance(near_limit, "video", "high").prompt) <= MAX_PROMPT_CHARS


def test_prompt_over_the_limit_is_kept_with_an_error() -> None:
    huge = "x" * (MAX_PROMPT_CHARS + 1)
    result = enhance(huge)
    assert result.prompt == huge and result.error


def test_unknown_format_is_a_caller_error() -> None:
    with pytest.raises(ValueError):
        enhance(PROMPT, "audio")
