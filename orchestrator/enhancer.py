"""Prompt enhancement for the ``*_enhanced`` job types.

Enhanced job types rewrite the user's prompt before generation. The rewrite
sits behind the small :class:`PromptEnhancer` protocol so a language-model
backend can be added later without touching callers. The backend shipped here,
:class:`RuleBasedEnhancer`, is deterministic and offline: it tidies the prompt
and appends descriptors suited to the output format and quality, which keeps
tests reproducible and gives a sensible fallback when a model is unavailable.

Enhancement never fails a job: on bad input the original prompt is returned
with :attr:`Enhancement.error` set, and the caller generates from that.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from orchestrator.config import Settings

__all__ = ["Enhancement", "PromptEnhancer", "RuleBasedEnhancer", "TransformersEnhancer", "get_enhancer",
           "MAX_PROMPT_CHARS"]

MAX_PROMPT_CHARS = 1000
"""Enhanced prompts never grow beyond this (text encoders truncate anyway)."""

_FORMATS = ("image", "video")
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


@dataclass(frozen=True)
class Enhancement:
    """The outcome of one enhancement; ``prompt`` is always safe to generate from."""

    prompt: str  # the enhanced prompt (== original on failure)
    original: str
    backend: str  # e.g. "rules"
    error: str | None = None  # set when enhancement failed and the original was kept


class PromptEnhancer(Protocol):
    """A backend that rewrites a prompt for a given output format and quality."""

    name: str

    def enhance(self, prompt: str, *, format: str, quality: str) -> Enhancement:
        """Return the rewritten prompt; report failure via ``Enhancement.error``."""
        ...


@dataclass(frozen=True)
class _Descriptor:
    """A phrase to append, skipped when any of its ``keys`` is already present.

    Keys are explicit (rather than every word of the phrase) so that related
    wording also counts: a prompt saying "cinematic" or "lit" already covers
    lighting, and generic words like "high" or "natural" block nothing.
    """

    text: str
    keys: frozenset[str]


def _d(text: str, *keys: str) -> _Descriptor:
    return _Descriptor(text, frozenset(keys))


# Ordered by importance: when a long prompt only has room for a few, the first
# ones win.
_BASE: dict[str, tuple[_Descriptor, ...]] = {
    "image": (
        _d("highly detailed", "detailed", "detail", "details"),
        _d("balanced composition", "composition", "composed"),
        _d("cinematic lighting", "cinematic", "lighting", "lit"),
        _d("sharp focus", "focus", "sharp", "blurry"),
    ),
    "video": (
        _d("smooth natural motion", "motion", "smooth"),
        _d("steady camera movement", "camera", "tracking", "dolly", "pan", "handheld"),
        _d("temporally consistent", "consistent", "consistency", "temporal", "temporally"),
        _d("cinematic lighting", "cinematic", "lighting", "lit"),
    ),
}
_HIGH_EXTRA: dict[str, tuple[_Descriptor, ...]] = {
    "image": (
        _d("intricate textures", "intricate", "texture", "textures", "textured"),
        _d("rich color depth", "color", "colors", "colour", "colours", "colorful", "colourful"),
        _d("ultra high resolution", "resolution", "4k", "8k", "hd", "uhd"),
    ),
    "video": (
        _d("fluid continuous action", "fluid", "continuous"),
        _d("stable subject details", "stable", "detail", "details", "detailed"),
        _d("high frame quality", "quality", "4k", "8k", "hd", "uhd"),
    ),
}


def _words(text: str) -> set[str]:
    """Lower-cased whole words; hyphenated words also count as their parts."""
    found = set(_WORD.findall(text.lower()))
    return found | {part for word in found for part in re.split(r"[-']", word)}


def _tidy(prompt: str) -> str:
    """Collapse whitespace, fix spacing around punctuation, capitalise the start.

    Only the first letter is upper-cased, and only when the first word is all
    lower case, so names such as "iPhone" or "eBay" are left alone.
    """
    text = " ".join(prompt.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r",{2,}", ",", text)
    text = text.rstrip(" ,;:")
    first = text.split(" ", 1)[0]
    if first.islower() and first[0].isalpha():
        text = text[0].upper() + text[1:]
    return text


def _room_for(word_count: int, available: int) -> int:
    """How many descriptors a prompt of ``word_count`` words should receive.

    Short prompts benefit most from extra terms; long ones already say what
    they want, so one fewer term for every 15 words beyond 30 (at least one).
    """
    return min(available, max(1, available - max(0, word_count - 30) // 15))


class RuleBasedEnhancer:
    """Deterministic, offline enhancer: tidy the prompt, append fitting descriptors."""

    name = "rules"

    def enhance(self, prompt: str, *, format: str, quality: str) -> Enhancement:
        """Enhance ``prompt`` for ``format`` ("image" | "video") at ``quality``.

        ``quality`` "high" adds extra descriptors; any other value (e.g.
        "fast") gets the base set. An unknown ``format`` is a caller bug and
        raises ValueError; a bad prompt is reported in the result instead.
        """
        if format not in _FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {_FORMATS}")
        if not isinstance(prompt, str) or not prompt.strip():
            return Enhancement(prompt=prompt, original=prompt, backend=self.name,
                               error="prompt is empty")
        text = _tidy(prompt)
        if len(text) > MAX_PROMPT_CHARS:
            # Nothing fits; hand back the original rather than cut the user's words.
            return Enhancement(prompt=prompt, original=prompt, backend=self.name,
                               error=f"prompt longer than {MAX_PROMPT_CHARS} characters; kept as is")
        candidates = _BASE[format] + (_HIGH_EXTRA[format] if quality.strip().lower() == "high" else ())
        present = _words(text)
        budget = _room_for(len(text.split()), len(candidates))
        terms: list[str] = []
        for descriptor in candidates:
            if len(terms) >= budget:
                break
            if descriptor.keys & present:
                continue
            if len(_join(text, [*terms, descriptor.text])) > MAX_PROMPT_CHARS:
                break
            terms.append(descriptor.text)
            present |= descriptor.keys
        return Enhancement(prompt=_join(text, terms), original=prompt, backend=self.name)


def _join(text: str, terms: list[str]) -> str:
    """Append descriptors as a list after a phrase, or as a new sentence after one."""
    if not terms:
        return text
    listed = ", ".join(terms)
    if text[-1] in ".!?":
        return f"{text} {listed[0].upper()}{listed[1:]}."
    return f"{text}, {listed}"


_INSTRUCTION = (
    "Rewrite the user's prompt for a text-to-{format} model as one detailed, vivid description "
    "of at most 80 words{extra}. Keep every subject and detail the user asked for; add "
    "composition, lighting{motion}. Answer with the rewritten prompt only.")


class TransformersEnhancer:
    """A local causal language model rewrites the prompt (``ENHANCER_BACKEND=transformers``).

    Instruction-tuned models get their chat template; base models a plain
    instruction prompt. Decoding is greedy, bounded by ``max_new_tokens`` and
    ``timeout`` seconds. The model loads on :meth:`load` (worker start) or
    first use; any failure keeps the original prompt and says why.
    """

    name = "transformers"

    def __init__(self, model_path: str, *, device: str = "auto", dtype: str = "auto",
                 max_new_tokens: int = 120, timeout: float = 20.0) -> None:
        self.model_path, self.device_setting, self.dtype_setting = str(model_path), device, dtype
        self.max_new_tokens, self.timeout = max_new_tokens, timeout
        self.model: object | None = None
        self.tokenizer: object | None = None
        self.device = "cpu"
        self._lock = threading.Lock()

    def load(self) -> dict[str, object]:
        """Load once (idempotent); returns device, model and parameter count."""
        with self._lock:
            if self.model is None:
                from orchestrator.devices import offline, resolve_device, resolve_dtype

                offline()
                from transformers import AutoModelForCausalLM, AutoTokenizer

                self.device = resolve_device(self.device_setting)
                dtype = resolve_dtype(self.dtype_setting, self.device)
                self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype,
                                                             local_files_only=True)
                self.model = model.to(self.device).eval()
            model = self.model
            from orchestrator.devices import memory_report

            return {"family": "enhancer", "backend": self.name, "model": self.model_path,
                    "device": self.device, "dtype": str(model.dtype).removeprefix("torch."),  # type: ignore[attr-defined]
                    "parameters": int(sum(p.numel() for p in model.parameters())),  # type: ignore[attr-defined]
                    **memory_report(self.device)}

    def _prompt(self, prompt: str, format: str, quality: str) -> str:
        extra = ", rich in fine detail" if quality == "high" else ""
        motion = " and the motion of subject and camera" if format == "video" else ""
        instruction = _INSTRUCTION.format(format=format, extra=extra, motion=motion)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(  # type: ignore[attr-defined]
                [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}],
                tokenize=False, add_generation_prompt=True)
        return f"{instruction}\n\nPrompt: {prompt}\nRewritten prompt:"

    def enhance(self, prompt: str, *, format: str, quality: str) -> Enhancement:
        if format not in _FORMATS:
            raise ValueError(f"unknown format {format!r}; expected one of {_FORMATS}")
        if not isinstance(prompt, str) or not prompt.strip():
            return Enhancement(prompt=prompt, original=prompt, backend=self.name, error="prompt is empty")
        try:
            self.load()
            import torch

            tok, model = self.tokenizer, self.model
            inputs = tok(self._prompt(prompt, format, quality), return_tensors="pt",  # type: ignore[operator]
                         add_special_tokens=False).to(self.device)
            started = time.monotonic()
            with self._lock, torch.inference_mode():
                out = model.generate(  # type: ignore[attr-defined]
                    **inputs, max_new_tokens=self.max_new_tokens, max_time=self.timeout,
                    do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)  # type: ignore[attr-defined]
            if time.monotonic() - started > self.timeout * 1.5:
                raise TimeoutError(f"took longer than {self.timeout:g}s")
            text = tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - enhancement never fails a job; the reason is kept
            return Enhancement(prompt=prompt, original=prompt, backend=self.name,
                               error=f"language model failed: {type(e).__name__}: {str(e)[:200]}")
        text = " ".join(text.replace("Rewritten prompt:", " ").split()).strip(' "\'')
        if not text:
            return Enhancement(prompt=prompt, original=prompt, backend=self.name,
                               error="language model returned an empty prompt; kept the original")
        return Enhancement(prompt=text[:MAX_PROMPT_CHARS], original=prompt, backend=self.name)


_BACKENDS: dict[str, type[RuleBasedEnhancer]] = {"rules": RuleBasedEnhancer}


def get_enhancer(backend: str = "rules", settings: "Settings | None" = None) -> PromptEnhancer:
    """Build the enhancer named by configuration; unknown names fail loudly at startup.

    ``transformers`` needs ``settings`` (model path, device, bounds); its model
    loads on first use or when the worker preloads it.
    """
    name = backend.strip().lower() if isinstance(backend, str) else backend
    if name == "transformers":
        if settings is None or settings.enhancer_model_path is None:
            raise ValueError("the transformers enhancer needs ENHANCER_MODEL_PATH")
        return TransformersEnhancer(
            str(settings.enhancer_model_path), device=settings.model_device,
            dtype=settings.model_dtype, max_new_tokens=settings.enhancer_max_new_tokens,
            timeout=settings.enhancer_timeout_seconds)
    try:
        factory = _BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prompt enhancer backend {backend!r}; "
                         f"available: {sorted([*_BACKENDS, 'transformers'])}") from None
    return factory()
