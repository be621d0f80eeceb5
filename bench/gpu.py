"""Times the model backends at the job types' real sizes: seconds per job and peak memory.

    python -m bench.gpu                      # random weights of the real architectures
    SDXL_MODEL_PATH=... [SDXL_CONFIG_PATH=...] WAN_MODEL_PATH=... ENHANCER_MODEL_PATH=... python -m bench.gpu
    python -m bench.gpu --tiny --steps 2     # the tests' tiny models: checks the bench runs (CPU)

Real weights are used for each family whose ``*_MODEL_PATH`` is set; otherwise
the real architecture (SDXL's UNet, VAE and both CLIP encoders; WAN 2.1 T2V
1.3B with UMT5-XXL; a Qwen2-7B-shaped LM) is built with random weights, which
times the same arithmetic. ``--results`` appends the table to
bench/RESULTS.md; only do that with figures from a real GPU run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.jobtypes import JOB_TYPES
from tasks.generators.base import GenerationSpec

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a lighthouse on a cliff at dusk, waves breaking", "a red kite over a green hill"]


def _spec(job_type: str, seed: int = 1) -> GenerationSpec:
    t = JOB_TYPES[job_type]
    return GenerationSpec(job_id=f"bench-{job_type}", job_type=t.name, format=t.format,
                          prompt=PROMPTS[0], negative_prompt="blurry, watermark", width=t.width,
                          height=t.height, steps=t.steps, guidance=t.guidance, frames=t.frames,
                          fps=t.fps, num_outputs=t.outputs, seed=seed,
                          expected_seconds=t.expected_seconds, sample_solver=t.sample_solver,
                          sample_shift=t.sample_shift)


def _random_sdxl(device: str, dtype: Any) -> Any:
    """SDXL base 1.0's architecture with random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.tiny_models import tokenizer, vocab_size

    with torch_device(device, dtype):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
                            sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        common = dict(vocab_size=vocab_size(), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      max_position_embeddings=77)
        enc1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_attention_heads=12, num_hidden_layers=12,
                                            hidden_act="quick_gelu", **common))
        enc2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu", **common))
    tok = tokenizer(77)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", timestep_spacing="leading",
                                         steps_offset=1))


def _random_wan(device: str, dtype: Any) -> Any:
    """Wan2.1-T2V-1.3B's architecture (with UMT5-XXL) with random weights."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.tiny_models import tokenizer, vocab_size

    with torch_device(device, dtype):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
        enc = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size(), d_model=4096, d_kv=64, d_ff=10240,
                                          num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                                          pad_token_id=0, eos_token_id=2))
    with torch_device(device, torch.float32):
        vae = AutoencoderKLWan()  # the defaults are Wan 2.1's VAE
    return WanPipeline(tokenizer=tokenizer(512), text_encoder=enc, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


class torch_device:  # noqa: N801 - a context manager used like torch.device
    """Build modules straight on ``device`` in ``dtype``."""

    def __init__(self, device: str, dtype: Any) -> None:
        import torch

        self.device, self.dtype, self.torch = torch.device(device), dtype, torch

    def __enter__(self) -> None:
        self.old = self.torch.get_default_dtype()
        self.torch.set_default_dtype(self.dtype)
        self.device.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.device.__exit__(*exc)
        self.torch.set_default_dtype(self.old)


def _backend(family: str, args: argparse.Namespace, tmp: Path) -> tuple[Any, str]:
    from tasks.generators.diffusion import SDXLGenerator, WanGenerator

    cls = SDXLGenerator if family == "sdxl" else WanGenerator
    env = os.environ.get(f"{family.upper()}_MODEL_PATH")
    if args.tiny:
        from tests import tiny_models

        path = getattr(tiny_models, family)(tmp / family)
        return cls(path, device=args.device, max_steps=args.steps), "tiny random"
    if env:
        config = os.environ.get("SDXL_CONFIG_PATH") if family == "sdxl" else None
        extra = {"config_path": Path(config)} if config else {}  # a single-file checkpoint's configs
        return (cls(Path(env), device=args.device, max_steps=args.steps, **extra),
                f"weights {Path(env).name}")

    build = _random_sdxl if family == "sdxl" else _random_wan

    class Random(cls):  # type: ignore[valid-type,misc]
        def _load(self) -> Any:
            pipe = build(self.device, self.dtype)
            if family == "wan":
                from diffusers import UniPCMultistepScheduler

                self.flow_shift, self._unipc = None, UniPCMultistepScheduler
            return pipe.to(self.device)

    return Random(Path(f"random-{family}"), device=args.device, max_steps=args.steps), "random weights"


def _enhancer(args: argparse.Namespace, tmp: Path) -> tuple[Any, str]:
    from orchestrator.enhancer import TransformersEnhancer

    env = os.environ.get("ENHANCER_MODEL_PATH")
    if args.tiny:
        from tests import tiny_models

        return TransformersEnhancer(str(tiny_models.causal_lm(tmp / "lm")), device=args.device), "tiny random"
    if env:
        return TransformersEnhancer(env, device=args.device), f"weights {Path(env).name}"
    # A Qwen2-7B-shaped model with random weights, saved so the real loader reads it.
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from orchestrator.devices import resolve_device, resolve_dtype
    from tests.tiny_models import tokenizer, vocab_size

    device = resolve_device(args.device)
    with torch_device(device, resolve_dtype("auto", device)):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size(), hidden_size=3584,
                                             intermediate_size=18944, num_hidden_layers=28,
                                             num_attention_heads=28, num_key_value_heads=4,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(tmp / "lm7b")
    tokenizer(4096, chat=True).save_pretrained(tmp / "lm7b")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return TransformersEnhancer(str(tmp / "lm7b"), device=args.device), "random weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="sdxl,wan,enhancer")
    ap.add_argument("--types", default="sdxl_image_fast,sdxl_image_high,image_fast,video_fast")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=0, help="cap denoising steps (0: the type's)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny random models")
    ap.add_argument("--results", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for family in ("sdxl", "wan"):
            if family not in families:
                continue
            t0 = time.monotonic()
            gen, source = _backend(family, args, tmp)
            load = time.monotonic() - t0
            for job_type in [t for t in args.types.split(",") if JOB_TYPES[t].family.value == family]:
                spec = _spec(job_type)
                t1 = time.monotonic()
                result = gen.generate(spec, lambda s, n: None)
                rows.append({"backend": family, "job_type": job_type, "source": source,
                             "device": gen.device, "dtype": str(gen.dtype).removeprefix("torch."),
                             "steps": result.metadata["steps"], "outputs": len(result.files),
                             "seconds": round(time.monotonic() - t1, 2), "load_seconds": round(load, 1),
                             "memory": result.metadata["memory"]})
                print(json.dumps(rows[-1]), flush=True)
            del gen
        if "enhancer" in families:
            t0 = time.monotonic()
            enh, source = _enhancer(args, tmp)
            info = enh.load()
            load = time.monotonic() - t0
            for fmt in ("image", "video"):
                t1 = time.monotonic()
                out = enh.enhance(PROMPTS[1], format=fmt, quality="high")
                rows.append({"backend": "enhancer", "job_type": f"{fmt} prompt", "source": source,
                             "device": info["device"], "dtype": info["dtype"], "steps": None,
                             "outputs": 1, "seconds": round(time.monotonic() - t1, 2),
                             "load_seconds": round(load, 1), "error": out.error,
                             "memory": {k: v for k, v in enh.load().items() if "bytes" in k}})
                print(json.dumps(rows[-1]), flush=True)
    table = _table(rows)
    print(table)
    if args.results:
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write(table)


def _table(rows: list[dict[str, Any]]) -> str:
    def peak(mem: dict[str, Any]) -> str:
        b = mem.get("peak_bytes", mem.get("peak_rss_bytes"))
        return f"{b / 2**30:.1f} GiB" if b else "?"

    out = [f"\n## Model backends ({time.strftime('%Y-%m-%d')}, {platform.node()})\n",
           "| backend | job | weights | device | dtype | steps | outputs | s/job | load s | peak memory |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['backend']} | {r['job_type']} | {r['source']} | {r['device']} | {r['dtype']} | "
                   f"{r['steps']} | {r['outputs']} | {r['seconds']} | {r['load_seconds']} | "
                   f"{peak(r['memory'])} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
