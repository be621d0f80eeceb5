"""A CPU-only stand-in for the diffusion models.

Development machines and CI have no GPU, yet the whole pipeline (queues,
progress, cancellation, uploads, thumbnails) must run end to end with real
PNG and MP4 files. :class:`ProceduralGenerator` renders abstract pictures
whose parameters come from a hash of the prompt and seed, so outputs are
reproducible and distinguishable, and it can stretch itself to the job type's
expected run time so timing-dependent behaviour is exercised too.

Every picture is a scalar field made of interfering plane waves plus a few
drifting Gaussian blobs, mapped through a cosine colour palette. Both kinds of
term are separable in x and y, so a whole frame is one small matrix product
(rank ~12) followed by a palette lookup — cheap enough for 83 frames of video
on a laptop-class CPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import av
import numpy as np
from PIL import Image

from orchestrator.errors import GenerationError
from tasks.generators.base import GeneratedFile, GenerationResult, GenerationSpec, ProgressCallback

__all__ = ["ProceduralGenerator", "encode_mp4", "poster_png"]

_WAVES = 4
_BLOBS = 4
_PALETTE_SIZE = 1024  # power of two: indices wrap with a bitwise AND
_MAX_DIMENSION = 4096
_THUMB_LONG_SIDE = 416  # 480x832 video -> 240x416 poster
_SEED_SPACE = 2**32


def _unit_floats(key: str, count: int) -> np.ndarray:
    """Uniform floats in [0, 1) derived only from ``key``.

    SHAKE-256 rather than a NumPy RNG: the stream is fixed by the hash
    standard, so a spec keeps producing the same parameters across NumPy
    releases.
    """
    raw = hashlib.shake_256(key.encode("utf-8")).digest(8 * count)
    return np.frombuffer(raw, dtype="<u8").astype(np.float64) / 2.0**64


class _Pattern:
    """The parameters of one picture, all drawn from the hash of ``key``.

    Coordinates are in long-side units with the origin at the image centre;
    speeds are rad/s of the ``t`` (seconds) passed to :meth:`indices`, which
    is what animates a video.
    """

    def __init__(self, key: str) -> None:
        u = iter(_unit_floats(key, 8 * _WAVES + 9 * _BLOBS + 16))

        def take(n: int, lo: float, hi: float) -> np.ndarray:
            return np.array([lo + (hi - lo) * next(u) for _ in range(n)])

        def signed(n: int, lo: float, hi: float) -> np.ndarray:
            return take(n, lo, hi) * np.where(take(n, 0.0, 1.0) < 0.5, -1.0, 1.0)

        self.wave_fx, self.wave_fy = signed(_WAVES, 0.4, 3.5), signed(_WAVES, 0.4, 3.5)
        self.wave_phase = take(_WAVES, 0.0, 2 * math.pi)
        self.wave_speed = signed(_WAVES, 0.3, 1.2)
        self.wave_amp = take(_WAVES, 0.3, 1.0)
        self.blob_cx, self.blob_cy = take(_BLOBS, -0.35, 0.35), take(_BLOBS, -0.45, 0.45)
        self.blob_sigma = take(_BLOBS, 0.07, 0.22)
        self.blob_amp = signed(_BLOBS, 0.8, 2.2)
        self.blob_orbit = take(_BLOBS, 0.02, 0.10)  # radius of each blob's drift
        self.blob_speed = signed(_BLOBS, 0.2, 0.8)
        self.blob_angle = take(_BLOBS, 0.0, 2 * math.pi)
        self.density = float(take(1, 0.12, 0.30)[0])  # palette cycles per field unit
        # Inigo Quilez cosine palette; integer frequencies make it periodic in
        # [0, 1) so the field can wrap around it without a visible seam.
        base, contrast = take(3, 0.35, 0.65), take(3, 0.25, 0.45)
        freq, shift = np.floor(take(3, 1.0, 2.999)), take(3, 0.0, 1.0)
        pos = np.arange(_PALETTE_SIZE)[:, None] / _PALETTE_SIZE
        self.rgb = np.clip(base + contrast * np.cos(2 * math.pi * (freq * pos + shift)), 0.0, 1.0)
        # Shift so palette positions are positive before the wrap-around AND.
        reach = float(self.wave_amp.sum() + np.abs(self.blob_amp).sum())
        self.offset = float(math.ceil(reach * self.density) + 1)

    def indices(self, xs: np.ndarray, ys: np.ndarray, t: float) -> np.ndarray:
        """Palette indices for the grid ``ys`` x ``xs`` at time ``t``.

        sin(X + Y) = sin X cos Y + cos X sin Y and a Gaussian is a product of
        two 1-D Gaussians, so the field is ``left @ right`` with tiny factors.
        """
        big_x = 2 * math.pi * np.outer(self.wave_fx, xs) + (self.wave_phase + self.wave_speed * t)[:, None]
        big_y = 2 * math.pi * np.outer(ys, self.wave_fy)
        angle = self.blob_angle + self.blob_speed * t
        cx = self.blob_cx + self.blob_orbit * np.cos(angle)
        cy = self.blob_cy + self.blob_orbit * np.sin(angle)
        inv = 1.0 / (2.0 * self.blob_sigma**2)
        left = np.hstack([self.wave_amp * np.cos(big_y), self.wave_amp * np.sin(big_y),
                          self.blob_amp * np.exp(-((ys[:, None] - cy) ** 2) * inv)])
        right = np.vstack([np.sin(big_x), np.cos(big_x),
                           np.exp(-((xs[None, :] - cx[:, None]) ** 2) * inv[:, None])])
        left32 = (left * (self.density * _PALETTE_SIZE)).astype(np.float32)
        field = left32 @ right.astype(np.float32)
        field += np.float32(self.offset * _PALETTE_SIZE)
        idx = field.astype(np.int32)
        idx &= _PALETTE_SIZE - 1
        return idx


def _grid(width: int, height: int, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in long-side units, so shapes keep their aspect."""
    side = max(width, height)
    xs = (np.arange(0, width, step) + step / 2 - width / 2) / side
    ys = (np.arange(0, height, step) + step / 2 - height / 2) / side
    return xs, ys


def _render_rgb(pattern: _Pattern, width: int, height: int, t: float) -> np.ndarray:
    lut = np.round(pattern.rgb * 255).astype(np.uint8)
    return np.take(lut, pattern.indices(*_grid(width, height), t), axis=0)


def _yuv_luts(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 limited-range palettes, so video frames skip RGB->YUV per pixel."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    u = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    v = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    return tuple(np.round(c).astype(np.uint8) for c in (y, u, v))  # type: ignore[return-value]


def _open_h264(buf: io.BytesIO, width: int, height: int, fps: int) -> tuple[Any, Any]:
    """An MP4 container writing one H.264 yuv420p stream into ``buf``."""
    container = av.open(buf, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    return container, stream


def encode_mp4(frames: Any, fps: int) -> bytes:
    """H.264 MP4 of RGB uint8 frames (an iterable of HxWx3 arrays), the same
    encoder settings as the procedural videos; used by the model backends."""
    buf = io.BytesIO()
    container = stream = None
    try:
        for n, rgb in enumerate(frames):
            if container is None:
                container, stream = _open_h264(buf, rgb.shape[1], rgb.shape[0], fps)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = n, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        if container is None:
            raise GenerationError("no frames to encode")
        for packet in stream.encode(None):
            container.mux(packet)
    finally:
        if container is not None:
            container.close()
    return buf.getvalue()


def poster_png(rgb: np.ndarray) -> bytes:
    """The video poster: the first frame scaled to at most 416 px on its long side."""
    h, w = rgb.shape[:2]
    scale = min(1.0, _THUMB_LONG_SIDE / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return _png(np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise GenerationError(message)


def _validate(spec: GenerationSpec) -> None:
    """Reject specs that would crash an encoder or write outside the job's files."""
    _check(spec.format in ("image", "video"), f"unknown format {spec.format!r}")
    _check(bool(spec.job_id) and not any(c in spec.job_id for c in "/\\\0")
           and spec.job_id not in (".", ".."), "job_id must be usable as a file name")
    for field in ("width", "height", "steps", "frames", "num_outputs", "fps", "seed"):
        value = getattr(spec, field)
        _check(isinstance(value, int) and not isinstance(value, bool),
               f"{field} must be an integer")
    _check(0 < spec.width <= _MAX_DIMENSION and 0 < spec.height <= _MAX_DIMENSION,
           f"width and height must be in 1..{_MAX_DIMENSION}")
    for field in ("steps", "frames", "num_outputs"):
        _check(getattr(spec, field) >= 1, f"{field} must be >= 1")
    _check(0 <= spec.seed < _SEED_SPACE, "seed must be in [0, 2**32)")
    for field in ("expected_seconds", "time_scale"):
        value = getattr(spec, field)
        _check(math.isfinite(value) and value >= 0, f"{field} must be finite and >= 0")
    if spec.format == "video":
        _check(spec.width % 2 == 0 and spec.height % 2 == 0,
               "video width and height must be even (yuv420p)")
        _check(spec.fps >= 1, "fps must be >= 1")
        _check(spec.num_outputs == 1, "a video job produces exactly one output")


@dataclass
class _Plan:
    """A job cut into units of pixel work, plus how to finish or abandon it."""

    units: list[Callable[[], None]]
    finish: Callable[[], GenerationResult]
    abort: Callable[[], None] = lambda: None


def _run_steps(units: list[Callable[[], None]], spec: GenerationSpec,
               progress: ProgressCallback) -> None:
    """Spread the units and the simulated run time evenly over the steps.

    Sleeping towards per-step deadlines (rather than a fixed sleep per step)
    makes the total wall time ~expected_seconds * time_scale however long the
    pixel work itself takes, while still giving a cancel point every step.
    """
    total = spec.steps
    budget = spec.expected_seconds * spec.time_scale
    start = time.monotonic()
    done = 0
    for step in range(1, total + 1):
        upto = len(units) * step // total
        while done < upto:
            try:
                units[done]()
            except GenerationError:
                raise
            except Exception as exc:  # encoder/pixel failures fail the job cleanly
                raise GenerationError(f"procedural generation failed ({type(exc).__name__})",
                                      details={"error_type": type(exc).__name__}) from exc
            done += 1
        if budget > 0:
            remaining = start + budget * step / total - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        progress(step, total)


class ProceduralGenerator:
    """Deterministic abstract images and videos; see the module docstring."""

    name = "procedural"

    def generate(self, spec: GenerationSpec, progress: ProgressCallback) -> GenerationResult:
        """Render ``spec``; output depends only on (prompt, seed + index, job type, size).

        The pixel work is split into units (one per image, one per video frame)
        interleaved with the progress steps, so a cancel raised from
        ``progress`` stops the work promptly and the last call comes only once
        every file is complete.
        """
        _validate(spec)
        plan = self._image_plan(spec) if spec.format == "image" else self._video_plan(spec)
        try:
            _run_steps(plan.units, spec, progress)
        except BaseException:
            plan.abort()
            raise
        return plan.finish()

    @staticmethod
    def _key(spec: GenerationSpec, seed: int) -> str:
        # The per-output seed (not the batch index) keys the pattern, so image i
        # of a batch is reproduced by a single-output job with seeds[i].
        return f"{spec.job_type}\x00{seed}\x00{spec.prompt}"

    def _metadata(self, spec: GenerationSpec, seeds: list[int]) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "generator": self.name, "seeds": seeds, "job_type": spec.job_type,
            "format": spec.format, "width": spec.width, "height": spec.height,
            "steps": spec.steps, "guidance": spec.guidance, "num_outputs": len(seeds),
        }
        for optional in ("sample_solver", "sample_shift"):
            if getattr(spec, optional) is not None:
                meta[optional] = getattr(spec, optional)
        return meta

    def _image_plan(self, spec: GenerationSpec) -> _Plan:
        seeds = [(spec.seed + i) % _SEED_SPACE for i in range(spec.num_outputs)]
        files: list[GeneratedFile] = []

        def unit(i: int) -> Callable[[], None]:
            def run() -> None:
                pattern = _Pattern(self._key(spec, seeds[i]))
                data = _png(_render_rgb(pattern, spec.width, spec.height, 0.0))
                files.append(GeneratedFile(f"{spec.job_id}_{i}.png", "image/png", data))
            return run

        def finish() -> GenerationResult:
            return GenerationResult(files=files, thumbnail=None, metadata=self._metadata(spec, seeds))

        return _Plan([unit(i) for i in range(spec.num_outputs)], finish)

    def _video_plan(self, spec: GenerationSpec) -> _Plan:
        pattern = _Pattern(self._key(spec, spec.seed))
        lut_y, lut_u, lut_v = _yuv_luts(pattern.rgb)
        w, h, fps = spec.width, spec.height, spec.fps
        xs, ys = _grid(w, h)
        cxs, cys = _grid(w, h, step=2)  # chroma sampled at 2x2 block centres
        # Frames are built straight in yuv420p (palette lookups per plane), so
        # neither NumPy nor swscale has to convert RGB per pixel.
        yuv = np.empty(w * h * 3 // 2, dtype=np.uint8)
        y_plane, u_plane, v_plane = np.split(yuv, [w * h, w * h * 5 // 4])
        buf = io.BytesIO()
        container, stream = _open_h264(buf, w, h, fps)
        thumb: list[bytes] = []

        def frame_unit(n: int) -> Callable[[], None]:
            def run() -> None:
                np.take(lut_y, pattern.indices(xs, ys, n / fps).ravel(), out=y_plane)
                chroma = pattern.indices(cxs, cys, n / fps).ravel()
                np.take(lut_u, chroma, out=u_plane)
                np.take(lut_v, chroma, out=v_plane)
                frame = av.VideoFrame.from_ndarray(yuv.reshape(h * 3 // 2, w), format="yuv420p")
                frame.pts, frame.time_base = n, Fraction(1, fps)
                packets = list(stream.encode(frame))
                if n == spec.frames - 1:
                    packets.extend(stream.encode(None))  # flush delayed frames
                for packet in packets:
                    container.mux(packet)
                if n == spec.frames - 1:
                    container.close()
            return run

        def thumbnail_unit() -> None:
            poster = Image.fromarray(_render_rgb(pattern, w, h, 0.0))
            scale = min(1.0, _THUMB_LONG_SIDE / max(w, h))
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            thumb.append(_png(np.asarray(poster.resize(size, Image.Resampling.BILINEAR))))

        def finish() -> GenerationResult:
            meta = self._metadata(spec, [spec.seed])
            meta.update(frames=spec.frames, fps=fps, codec="h264",
                        duration_seconds=spec.frames / fps)
            return GenerationResult(
                files=[GeneratedFile(f"{spec.job_id}.mp4", "video/mp4", buf.getvalue())],
                thumbnail=GeneratedFile(f"{spec.job_id}_thumb.png", "image/png", thumb[0]),
                metadata=meta,
            )

        def abort() -> None:
            with contextlib.suppress(Exception):  # the abort reason matters more
                container.close()

        units: list[Callable[[], None]] = [thumbnail_unit]
        units.extend(frame_unit(n) for n in range(spec.frames))
        return _Plan(units, finish, abort)
