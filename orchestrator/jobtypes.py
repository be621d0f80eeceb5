"""The ten job types of the contract (CONTRACT.md §1), as one table.

Everything that differs between job types (family, price, size, steps, outputs,
expected time, bucket cap) is read from here; nothing else in the service
spells a job type out.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Family(str, enum.Enum):
    """A worker family: one Celery queue and one legacy Redis list each."""

    SDXL = "sdxl"
    WAN = "wan"

    @property
    def legacy_list(self) -> str:
        return f"{self.value}_queue"


MB = 1024 * 1024
VIDEO_FPS = 16


@dataclass(frozen=True)
class JobType:
    """One row of the contract's job-type table."""

    name: str
    family: Family
    format: str  # "image" | "video"
    quality: str  # "fast" | "high"
    credits: int
    width: int
    height: int
    steps: int
    guidance: float
    frames: int
    outputs: int
    expected_seconds: float
    model_variant: str
    bucket_cap: int
    enhanced: bool = False

    @property
    def bucket(self) -> str:
        return self.name

    @property
    def is_sdxl(self) -> bool:
        return self.family is Family.SDXL

    @property
    def is_video(self) -> bool:
        return self.format == "video"

    @property
    def file_extension(self) -> str:
        return "mp4" if self.is_video else "png"

    @property
    def content_type(self) -> str:
        return "video/mp4" if self.is_video else "image/png"

    @property
    def size(self) -> str:
        """The legacy ``config.size`` string, ``width*height``."""
        return f"{self.width}*{self.height}"

    @property
    def sample_solver(self) -> str | None:
        return "unipc" if self.family is Family.WAN else None

    @property
    def sample_shift(self) -> float | None:
        return 5.0 if self.family is Family.WAN else None

    @property
    def fps(self) -> int:
        return VIDEO_FPS

    @property
    def soft_time_limit(self) -> int:
        """Seconds before the worker is asked to stop: generous over the expected time."""
        return int(self.expected_seconds * 4 + 60)

    @property
    def hard_time_limit(self) -> int:
        """Seconds before the worker process is killed."""
        return self.soft_time_limit + 60


_SDXL = dict(family=Family.SDXL, format="image", width=1024, height=1024, frames=1, outputs=6,
             model_variant="lustify_sdxl")
_WAN = dict(family=Family.WAN, width=480, height=832, model_variant="wan_2_1_1_3b")
_WAN_IMAGE = dict(_WAN, format="image", frames=1, outputs=1)
_WAN_VIDEO = dict(_WAN, format="video", frames=83, outputs=1)
_FAST = dict(quality="fast", steps=25, guidance=6.5)
_HIGH = dict(quality="high", steps=50, guidance=7.5)

JOB_TYPES: dict[str, JobType] = {
    t.name: t
    for t in (
        JobType("sdxl_image_fast", **_SDXL, quality="fast", credits=1, steps=15, guidance=6.0,
                expected_seconds=30, bucket_cap=5 * MB),
        JobType("sdxl_image_high", **_SDXL, quality="high", credits=2, steps=25, guidance=7.5,
                expected_seconds=45, bucket_cap=10 * MB),
        JobType("image_fast", **_WAN_IMAGE, **_FAST, credits=1, expected_seconds=73, bucket_cap=5 * MB),
        JobType("image_high", **_WAN_IMAGE, **_HIGH, credits=2, expected_seconds=90, bucket_cap=10 * MB),
        JobType("video_fast", **_WAN_VIDEO, **_FAST, credits=3, expected_seconds=180, bucket_cap=50 * MB),
        JobType("video_high", **_WAN_VIDEO, **_HIGH, credits=5, expected_seconds=280, bucket_cap=200 * MB),
        JobType("image7b_fast_enhanced", **_WAN_IMAGE, **_FAST, credits=2, expected_seconds=87,
                bucket_cap=20 * MB, enhanced=True),
        JobType("image7b_high_enhanced", **_WAN_IMAGE, **_HIGH, credits=3, expected_seconds=104,
                bucket_cap=20 * MB, enhanced=True),
        JobType("video7b_fast_enhanced", **_WAN_VIDEO, **_FAST, credits=4, expected_seconds=194,
                bucket_cap=100 * MB, enhanced=True),
        JobType("video7b_high_enhanced", **_WAN_VIDEO, **_HIGH, credits=6, expected_seconds=294,
                bucket_cap=100 * MB, enhanced=True),
    )
}

VALID_JOB_TYPES: tuple[str, ...] = tuple(JOB_TYPES)
BUCKETS: frozenset[str] = frozenset(JOB_TYPES)
LONGEST_HARD_TIME_LIMIT: int = max(t.hard_time_limit for t in JOB_TYPES.values())


def parse_job_type(name: str) -> JobType:
    """Parse a job-type string the way the legacy system did, and look it up.

    ``sdxl_`` → SDXL; ``image7b_``/``video7b_`` → enhanced with the quality
    taken from ``_fast_``; otherwise ``<format>_<quality>``.

    Raises:
        KeyError: not one of the ten types (callers turn it into a 400 that
            lists the valid ones).
    """
    if name.startswith("sdxl_"):
        family, fmt = Family.SDXL, "image"
        quality = name.rsplit("_", 1)[-1]
        enhanced = False
    elif name.startswith(("image7b_", "video7b_")):
        family, fmt = Family.WAN, name.split("7b_", 1)[0]
        quality = "fast" if "_fast_" in name else "high"
        enhanced = True
    else:
        family, enhanced = Family.WAN, False
        fmt, _, quality = name.partition("_")
    spec = JOB_TYPES[name]
    # The table is the truth; the parse must agree with it or the table is wrong.
    assert (spec.family, spec.format, spec.quality, spec.enhanced) == (family, fmt, quality, enhanced), name
    return spec
