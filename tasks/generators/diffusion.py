"""Model backends behind the :class:`~tasks.generators.base.Generator` protocol.

``SDXL_BACKEND=diffusers`` runs :class:`SDXLGenerator` (a StableDiffusionXLPipeline
from a single-file checkpoint with the configs in ``SDXL_CONFIG_PATH``, or from a
diffusers folder); ``WAN_BACKEND=diffusers`` runs :class:`WanGenerator` (WanPipeline
with AutoencoderKLWan in float32 and the UniPC scheduler at the job type's flow
shift). Both load once per worker process, from local paths only
(``HF_HUB_OFFLINE=1``, ``local_files_only``), and stay warm.

torch and diffusers are imported here only, inside the functions that need
them: a service installed without the ``models`` extra never imports them.

Per job: the job's steps (capped by ``MODEL_MAX_STEPS`` in tests), guidance,
size, batch size and negative prompt are passed to the pipeline; image ``i`` of
a batch is drawn from its own ``torch.Generator`` seeded ``seed + i``, so a
single-image job with that seed reproduces it; progress is reported after each
denoising step, and the progress callback raising (cancel) ends the run
between steps; CUDA running out of memory fails the job with a clear reason
and frees the cache so the next job runs.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.devices import memory_report, offline, resolve_device, resolve_dtype
from orchestrator.errors import GenerationError
from tasks.generators.base import GeneratedFile, GenerationResult, GenerationSpec, ProgressCallback
from tasks.generators.procedural import _png, encode_mp4, poster_png

__all__ = ["SDXLGenerator", "WanGenerator", "resolve_device", "resolve_dtype", "memory_report",
           "WAN_TEMPORAL_STRIDE"]

log = logging.getLogger(__name__)

_SEED_SPACE = 2**32
WAN_TEMPORAL_STRIDE = 4  # WAN's VAE packs 4 frames per latent frame: it makes 4n+1 frames


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _to_uint8(images: Any) -> np.ndarray:
    """[0, 1] floats to bytes: one new float array, scaled, clipped and rounded in place (an
    83-frame 480x832 video is 100 M values: each temporary would cost 400 MB)."""
    out = np.multiply(np.asarray(images, dtype=np.float32), 255.0)
    np.clip(out, 0.0, 255.0, out=out)
    out += 0.5
    return out.astype(np.uint8)


class _Backend:
    """Shared loading, device handling, progress wiring and failure mapping."""

    name = "diffusers"
    family = ""

    def __init__(self, model_path: Path, *, device: str = "auto", dtype: str = "auto",
                 max_steps: int = 0) -> None:
        offline()
        import torch

        self.model_path = Path(model_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_steps = max_steps
        self._lock = threading.Lock()  # one pipeline call at a time per process
        started = time.monotonic()
        with torch.inference_mode():
            self.pipe = self._load()
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.monotonic() - started
        log.info("%s backend loaded: %s", self.family, self.describe())

    def _load(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Device, dtype, model and memory: logged at load, exposed as worker metrics."""
        params = sum(p.numel() for c in self.pipe.components.values()
                     if hasattr(c, "parameters") for p in c.parameters())
        return {"family": self.family, "backend": self.name, "model": str(self.model_path),
                "device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                "parameters": int(params), "load_seconds": round(self.load_seconds, 2),
                **memory_report(self.device)}

    def _steps(self, spec: GenerationSpec) -> int:
        return min(spec.steps, self.max_steps) if self.max_steps else spec.steps

    @staticmethod
    def _step_callback(progress: ProgressCallback, total: int) -> Any:
        def on_step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            progress(step + 1, total)  # may raise: a cancel leaves the pipeline here
            return kwargs
        return on_step_end

    def _generators(self, seeds: list[int]) -> list[Any]:
        import torch

        gen_device = "cpu" if self.device == "cpu" else self.device
        return [torch.Generator(device=gen_device).manual_seed(s) for s in seeds]

    def generate(self, spec: GenerationSpec, progress: ProgressCallback) -> GenerationResult:
        import torch

        if not (0 <= spec.seed < _SEED_SPACE):
            raise GenerationError("seed must be in [0, 2**32)")
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        started = time.monotonic()
        try:
            with self._lock, torch.inference_mode():
                result = self._run(spec, progress)
        except GenerationError:
            raise
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise GenerationError(f"{self.family} generation failed ({type(exc).__name__})",
                                      details={"error_type": type(exc).__name__}) from exc
            log.error("job %s: out of memory on %s; cache freed", spec.job_id, self.device)
            raise GenerationError(
                f"out of GPU memory on {self.device} generating {spec.job_type}; the job was "
                "stopped and the memory freed", details={"error_type": "OutOfMemoryError"}) from exc
        finally:
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        result.metadata["seconds"] = round(time.monotonic() - started, 3)
        result.metadata["memory"] = memory_report(self.device)
        return result

    def _run(self, spec: GenerationSpec, progress: ProgressCallback) -> GenerationResult:  # pragma: no cover
        raise NotImplementedError

    def _metadata(self, spec: GenerationSpec, seeds: list[int], steps: int) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "generator": f"{self.family}-{self.name}", "seeds": seeds, "job_type": spec.job_type,
            "format": spec.format, "width": spec.width, "height": spec.height, "steps": steps,
            "guidance": spec.guidance, "num_outputs": len(seeds), "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."), "model": self.model_path.name,
        }
        if steps != spec.steps:
            meta["job_type_steps"] = spec.steps
        return meta


class SDXLGenerator(_Backend):
    """SDXL through diffusers: a single-file checkpoint (with ``config_path``, a diffusers
    SDXL folder's configs and tokenizers, no weights needed) or a diffusers folder."""

    family = "sdxl"

    def __init__(self, model_path: Path, *, config_path: Path | None = None, **kwargs: Any) -> None:
        self.config_path = Path(config_path) if config_path is not None else None
        super().__init__(model_path, **kwargs)

    def _load(self) -> Any:
        from diffusers import StableDiffusionXLPipeline

        path = self.model_path
        if path.is_file():
            # An original-format (A1111/ComfyUI) checkpoint; diffusers converts it on load.
            # Its configs come from config_path: without one diffusers would look for SDXL
            # base's on the Hugging Face Hub.
            if self.config_path is None or not (self.config_path / "model_index.json").is_file():
                raise GenerationError(
                    f"{path} is a single-file checkpoint: SDXL_CONFIG_PATH must name a diffusers "
                    "SDXL folder with its configs and tokenizers (model_index.json)")
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(self.config_path), torch_dtype=self.dtype,
                local_files_only=True)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(path), torch_dtype=self.dtype, local_files_only=True)
        return pipe.to(self.device)

    def _run(self, spec: GenerationSpec, progress: ProgressCallback) -> GenerationResult:
        if spec.format != "image" or spec.frames != 1:
            raise GenerationError("the SDXL backend makes images only")
        n = spec.num_outputs
        seeds = [(spec.seed + i) % _SEED_SPACE for i in range(n)]
        steps = self._steps(spec)
        negative = spec.negative_prompt or None
        cfg = spec.guidance > 1.0
        # The prompts are encoded here, not inside the pipeline, so what the
        # negative prompt turned into is measurable (and recorded) per job.
        (embeds, neg_embeds, pooled, neg_pooled) = self.pipe.encode_prompt(
            prompt=spec.prompt, device=self.pipe._execution_device, num_images_per_prompt=n,
            do_classifier_free_guidance=cfg, negative_prompt=negative)
        out = self.pipe(
            prompt_embeds=embeds, negative_prompt_embeds=neg_embeds,
            pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled,
            num_images_per_prompt=1, width=spec.width, height=spec.height,  # embeds hold all n
            num_inference_steps=steps, guidance_scale=spec.guidance,
            generator=self._generators(seeds), output_type="np",
            callback_on_step_end=self._step_callback(progress, steps))
        images = _to_uint8(out.images)
        files = [GeneratedFile(f"{spec.job_id}_{i}.png", "image/png", _png(images[i]))
                 for i in range(n)]
        meta = self._metadata(spec, seeds, steps)
        meta["negative_prompt"] = negative
        meta["negative_embeds_norm"] = (round(float(neg_embeds.float().norm()), 4)
                                        if neg_embeds is not None else None)
        return GenerationResult(files=files, thumbnail=None, metadata=meta)


class WanGenerator(_Backend):
    """WAN 2.1 text-to-video through diffusers, for WAN's image and video types."""

    family = "wan"

    def _load(self) -> Any:
        import torch
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

        if not (self.model_path / "model_index.json").is_file():
            raise GenerationError(f"{self.model_path} is not a diffusers folder (no model_index.json)")
        # The VAE stays float32 (as the reference code runs it): bf16 decoding bands colours.
        vae = AutoencoderKLWan.from_pretrained(str(self.model_path), subfolder="vae",
                                               torch_dtype=torch.float32, local_files_only=True)
        pipe = WanPipeline.from_pretrained(str(self.model_path), vae=vae, torch_dtype=self.dtype,
                                           local_files_only=True)
        self.flow_shift: float | None = None
        self._unipc = UniPCMultistepScheduler
        return pipe.to(self.device)

    def _scheduler(self, shift: float) -> None:
        if self.flow_shift != shift:
            self.pipe.scheduler = self._unipc.from_config(self.pipe.scheduler.config, flow_shift=shift)
            self.flow_shift = shift

    def _run(self, spec: GenerationSpec, progress: ProgressCallback) -> GenerationResult:
        if spec.num_outputs != 1:
            raise GenerationError("a WAN job produces exactly one output")
        if spec.width % 16 or spec.height % 16:
            raise GenerationError("WAN sizes must be multiples of 16")
        self._scheduler(spec.sample_shift or 5.0)
        steps = self._steps(spec)
        # WAN makes 4n+1 frames; more than asked are made and the tail is cut.
        made = spec.frames if (spec.frames - 1) % WAN_TEMPORAL_STRIDE == 0 else \
            ((spec.frames - 1) // WAN_TEMPORAL_STRIDE + 1) * WAN_TEMPORAL_STRIDE + 1
        out = self.pipe(
            prompt=spec.prompt, negative_prompt=spec.negative_prompt or None,
            height=spec.height, width=spec.width, num_frames=made,
            num_inference_steps=steps, guidance_scale=spec.guidance,
            generator=self._generators([spec.seed])[0], output_type="np",
            callback_on_step_end=self._step_callback(progress, steps))
        frames = _to_uint8(out.frames[0][: spec.frames])  # (frames, H, W, 3)
        meta = self._metadata(spec, [spec.seed], steps)
        meta.update(sample_solver="unipc", sample_shift=self.flow_shift,
                    negative_prompt=spec.negative_prompt or None)
        if spec.format == "image":
            return GenerationResult(
                files=[GeneratedFile(f"{spec.job_id}_0.png", "image/png", _png(frames[0]))],
                thumbnail=None, metadata=meta)
        meta.update(frames=int(frames.shape[0]), generated_frames=made, fps=spec.fps, codec="h264",
                    duration_seconds=frames.shape[0] / spec.fps)
        return GenerationResult(
            files=[GeneratedFile(f"{spec.job_id}.mp4", "video/mp4", encode_mp4(frames, spec.fps))],
            thumbnail=GeneratedFile(f"{spec.job_id}_thumb.png", "image/png", poster_png(frames[0])),
            metadata=meta)
