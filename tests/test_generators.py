"""Behaviour of the procedural generator: real files, determinism, progress, cancel."""
from __future__ import annotations

import dataclasses
import io
import json
import time

import av
import numpy as np
import pytest
from PIL import Image

from orchestrator.errors import GenerationError
from tasks.generators import procedural
from tasks.generators.base import GenerationResult, GenerationSpec, Generator
from tasks.generators.procedural import ProceduralGenerator

SDXL = GenerationSpec(
    job_id="job-sdxl", job_type="sdxl_image_fast", format="image",
    prompt="a red fox in fresh snow", negative_prompt="blurry",
    width=1024, height=1024, steps=8, guidance=7.0, frames=1, fps=16,
    num_outputs=6, seed=1234, expected_seconds=8.0,
)
WAN = GenerationSpec(
    job_id="job-wan", job_type="video_high", format="video",
    prompt="waves rolling onto a beach at dusk", negative_prompt=None,
    width=480, height=832, steps=10, guidance=5.0, frames=83, fps=16,
    num_outputs=1, seed=99, expected_seconds=60.0,
    sample_solver="unipc", sample_shift=8.0,
)
SMALL = dataclasses.replace(SDXL, width=96, height=64, num_outputs=2, steps=5)


class Abort(Exception):
    """Stands in for the worker's cancellation exception."""


def run(spec: GenerationSpec) -> tuple[GenerationResult, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    result = ProceduralGenerator().generate(spec, lambda done, total: calls.append((done, total)))
    return result, calls


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def decode_mp4(data: bytes) -> tuple[av.video.stream.VideoStream, list[np.ndarray]]:
    container = av.open(io.BytesIO(data))
    stream = container.streams.video[0]
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    container.close()
    return stream, frames


def test_satisfies_generator_protocol() -> None:
    generator: Generator = ProceduralGenerator()
    assert generator.name == "procedural"


def test_sdxl_job_gives_six_rgb_pngs_of_exact_size() -> None:
    result, _ = run(SDXL)
    assert [f.name for f in result.files] == [f"job-sdxl_{i}.png" for i in range(6)]
    for f in result.files:
        assert f.content_type == "image/png"
        image = decode_png(f.data)
        assert image.size == (1024, 1024) and image.mode == "RGB"
    assert result.thumbnail is None
    assert result.metadata["generator"] == "procedural"
    assert result.metadata["seeds"] == [1234 + i for i in range(6)]
    json.dumps(result.metadata)  # JSON-safe


def test_non_square_image_respects_width_and_height() -> None:
    result, _ = run(SMALL)
    assert len(result.files) == 2
    array = np.asarray(decode_png(result.files[0].data))
    assert array.shape == (64, 96, 3)
    assert array.std() > 10  # an actual picture, not a flat fill


def test_images_in_a_batch_differ_and_seeds_wrap() -> None:
    result, _ = run(dataclasses.replace(SMALL, seed=2**32 - 1))
    assert result.metadata["seeds"] == [2**32 - 1, 0]
    assert result.files[0].data != result.files[1].data


def test_batch_image_is_reproducible_from_its_recorded_seed() -> None:
    batch, _ = run(SMALL)
    single, _ = run(dataclasses.replace(SMALL, num_outputs=1, seed=batch.metadata["seeds"][1]))
    assert single.files[0].data == batch.files[1].data


def test_wan_job_gives_h264_mp4_with_exact_frames_size_and_rate() -> None:
    result, _ = run(WAN)
    assert len(result.files) == 1
    video = result.files[0]
    assert video.name == "job-wan.mp4" and video.content_type == "video/mp4"
    stream, frames = decode_mp4(video.data)
    assert stream.codec_context.name == "h264"
    assert (stream.width, stream.height) == (480, 832)
    assert stream.average_rate == 16
    assert len(frames) == 83
    assert frames[0].shape == (832, 480, 3)
    meta = result.metadata
    assert meta["seeds"] == [99] and meta["generator"] == "procedural"
    assert (meta["frames"], meta["fps"], meta["width"], meta["height"]) == (83, 16, 480, 832)
    assert meta["sample_solver"] == "unipc" and meta["sample_shift"] == 8.0
    json.dumps(meta)


def test_video_animates_smoothly() -> None:
    result, _ = run(dataclasses.replace(WAN, frames=33))
    _, frames = decode_mp4(result.files[0].data)
    steps = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:])]
    overall = np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean()
    assert min(steps) > 0  # it moves every frame...
    assert max(steps) < overall  # ...in small increments rather than jumps


def test_video_thumbnail_is_a_small_poster_of_the_first_frame() -> None:
    result, _ = run(dataclasses.replace(WAN, frames=3))
    thumb = result.thumbnail
    assert thumb is not None
    assert thumb.name == "job-wan_thumb.png" and thumb.content_type == "image/png"
    poster = decode_png(thumb.data)
    assert poster.size == (240, 416) and poster.mode == "RGB"
    _, frames = decode_mp4(result.files[0].data)
    first = np.asarray(Image.fromarray(frames[0]).resize(poster.size, Image.Resampling.BILINEAR))
    assert np.abs(first.astype(int) - np.asarray(poster).astype(int)).mean() < 8


def test_same_spec_gives_identical_bytes() -> None:
    assert run(SMALL)[0].files == run(SMALL)[0].files
    video = dataclasses.replace(WAN, frames=5)
    first, second = run(video)[0], run(video)[0]
    assert first.files == second.files and first.thumbnail == second.thumbnail


@pytest.mark.parametrize("change", [{"seed": 1235}, {"prompt": "a blue whale"},
                                    {"job_type": "sdxl_image_high"}])
def test_different_inputs_give_different_pixels(change: dict[str, object]) -> None:
    base = np.asarray(decode_png(run(SMALL)[0].files[0].data))
    other = np.asarray(decode_png(run(dataclasses.replace(SMALL, **change))[0].files[0].data))
    assert np.abs(base.astype(int) - other.astype(int)).mean() > 5


def test_different_seed_gives_different_video() -> None:
    video = dataclasses.replace(WAN, frames=5)
    assert run(video)[0].files[0].data != run(dataclasses.replace(video, seed=100))[0].files[0].data


@pytest.mark.parametrize("spec", [SMALL, dataclasses.replace(WAN, frames=9, steps=25)])
def test_progress_is_reported_every_step_in_order(spec: GenerationSpec) -> None:
    _, calls = run(spec)
    assert calls == [(step, spec.steps) for step in range(1, spec.steps + 1)]


@pytest.mark.parametrize("spec", [dataclasses.replace(SMALL, steps=6),
                                  dataclasses.replace(WAN, frames=20, steps=6)])
def test_raising_progress_aborts_generation(spec: GenerationSpec) -> None:
    calls: list[int] = []
    error = Abort("cancelled")

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if done == 3:
            raise error

    with pytest.raises(Abort) as caught:
        ProceduralGenerator().generate(spec, progress)
    assert caught.value is error  # propagated untouched, not wrapped
    assert calls == [1, 2, 3]


def test_time_scale_stretches_generation_to_expected_time() -> None:
    spec = dataclasses.replace(SMALL, expected_seconds=0.5, time_scale=0.6, steps=4)
    started = time.monotonic()
    run(spec)
    assert time.monotonic() - started >= 0.29


def test_time_scale_zero_never_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sleep(seconds: float) -> None:
        raise AssertionError("slept although time_scale is 0")

    monkeypatch.setattr(procedural.time, "sleep", no_sleep)
    run(dataclasses.replace(SMALL, expected_seconds=100.0))


@pytest.mark.parametrize("spec", [
    dataclasses.replace(SMALL, width=0),
    dataclasses.replace(SMALL, height=-4),
    dataclasses.replace(SMALL, num_outputs=0),
    dataclasses.replace(SMALL, frames=0),
    dataclasses.replace(SMALL, steps=0),
    dataclasses.replace(SMALL, seed=2**32),
    dataclasses.replace(SMALL, seed=-1),
    dataclasses.replace(SMALL, format="audio"),
    dataclasses.replace(SMALL, job_id="../escape"),
    dataclasses.replace(SMALL, time_scale=-1.0),
    dataclasses.replace(WAN, width=481),
    dataclasses.replace(WAN, height=833),
    dataclasses.replace(WAN, fps=0),
    dataclasses.replace(WAN, num_outputs=2),
])
def test_invalid_specs_raise_generation_error(spec: GenerationSpec) -> None:
    calls: list[int] = []
    with pytest.raises(GenerationError):
        ProceduralGenerator().generate(spec, lambda done, total: calls.append(done))
    assert calls == []
