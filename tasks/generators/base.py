"""The contract between the worker layer and whatever produces pixels.

Workers only ever talk to a :class:`Generator`: they build a
:class:`GenerationSpec` from the job row, hand over a progress callback and
receive a :class:`GenerationResult` of in-memory files to upload. Keeping the
interface this small lets the procedural stand-in used in development and
tests be swapped for a real diffusion backend without touching task code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

__all__ = [
    "GenerationSpec",
    "GeneratedFile",
    "GenerationResult",
    "ProgressCallback",
    "Generator",
]


@dataclass(frozen=True)
class GenerationSpec:
    """Everything a generator needs to know about one job, already resolved.

    The spec is frozen and self-contained (no database handles) so it can be
    serialised into a task message and so that generating the same spec twice
    is expected to give the same output.
    """

    job_id: str
    job_type: str  # e.g. "sdxl_image_fast", "video_high", "image7b_fast_enhanced"
    format: str  # "image" | "video"
    prompt: str  # already enhanced when the job type is enhanced
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    frames: int  # 1 for images, 83 for videos
    fps: int  # 16
    num_outputs: int  # 6 for SDXL (may be 1..6), 1 for WAN
    seed: int  # 0 <= seed < 2**32
    expected_seconds: float  # the job type's expected run time
    # Generation takes expected_seconds * time_scale of wall time; 0 means as
    # fast as possible. Lets dev/test environments mimic real GPU latency.
    time_scale: float = 0.0
    sample_solver: str | None = None
    sample_shift: float | None = None


@dataclass(frozen=True)
class GeneratedFile:
    """One output held in memory, ready to be uploaded under ``name``."""

    name: str  # file name only, no directories, e.g. f"{job_id}_0.png"
    content_type: str  # "image/png" | "video/mp4"
    data: bytes


@dataclass(frozen=True)
class GenerationResult:
    """What a finished generation hands back to the worker."""

    files: list[GeneratedFile]  # the outputs, in order
    # For videos a small poster PNG (f"{job_id}_thumb.png") so listings need
    # not download the MP4; None for images.
    thumbnail: GeneratedFile | None
    # JSON-safe; always includes "seeds" (one int per output) and "generator".
    metadata: dict[str, Any]


ProgressCallback = Callable[[int, int], None]
"""``(step_done, total_steps)``.

The callback may raise to abort the job (cooperative cancellation); generators
must let that exception propagate untouched rather than wrapping it.
"""


class Generator(Protocol):
    """Anything that can turn a spec into files while reporting progress."""

    name: str

    def generate(self, spec: GenerationSpec, progress: ProgressCallback) -> GenerationResult:
        """Produce the outputs for ``spec``, calling ``progress`` once per step."""
        ...
