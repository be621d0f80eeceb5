"""The model backends (issue 8) on tiny random models, through real Celery workers.

The models are built here (tests/tiny_models.py) from small configs of the
real architectures and saved as the loaders read them; the workers load them
at process start from the env vars, as a GPU box would. The SDXL worker loads
the single-file checkpoint (the old workers' format); one test restarts it on
the diffusers folder. ``MODEL_MAX_STEPS`` caps the denoising steps (a CPU has no
time for 15-50 steps), never the sizes: images and videos have the job type's
exact size and length.
"""
from __future__ import annotations

import io
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

# `make test` installs the `models` extra: a missing one fails here, it is never skipped.
import diffusers  # noqa: E402,F401
import requests  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402,F401
from PIL import Image  # noqa: E402

from orchestrator.config import ConfigurationError, Settings  # noqa: E402
from orchestrator.jobtypes import JOB_TYPES  # noqa: E402
from tasks.generators.base import GenerationSpec  # noqa: E402
from tests import tiny_models  # noqa: E402
from tests.stack import Stack, make_stack  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    sdxl = tiny_models.sdxl(root / "sdxl")
    ckpt, config = tiny_models.sdxl_single_file(sdxl, root / "sdxl-tiny.safetensors", root / "sdxl-config")
    return {"sdxl": sdxl, "sdxl_file": ckpt, "sdxl_config": config, "wan": tiny_models.wan(root / "wan"),
            "lm": tiny_models.causal_lm(root / "lm")}


def _wait_model_ready(stack: Stack, *workers: str, timeout: float = 90) -> None:
    """The pool's children load the models after the worker says "ready"."""
    deadline = time.monotonic() + timeout
    while not all("model ready:" in (stack.logs / f"{w}.log").read_text(errors="replace")
                  .rsplit("=== start", 1)[-1] for w in workers):
        assert time.monotonic() < deadline, "".join(stack.log_tail(w) for w in workers)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = make_stack("postgres-redis", tmp_path_factory.mktemp("models-stack"),
                    ("web", "worker_sdxl", "worker_wan"), redis_db=14,  # no other module flushes it
                    SDXL_BACKEND="diffusers", SDXL_MODEL_PATH=str(models["sdxl_file"]),
                    SDXL_CONFIG_PATH=str(models["sdxl_config"]),
                    WAN_BACKEND="diffusers", WAN_MODEL_PATH=str(models["wan"]),
                    ENHANCER_BACKEND="transformers", ENHANCER_MODEL_PATH=str(models["lm"]),
                    ENHANCER_MAX_NEW_TOKENS="12", MODEL_DEVICE="cpu", MODEL_MAX_STEPS="3",
                    LEASE_SECONDS="4", OMP_NUM_THREADS="1")
    with st.running():
        _wait_model_ready(st, "worker_sdxl", "worker_wan")
        yield st


def _result(stack: Stack, job_id: str) -> dict:
    """What the generator reported (jobs.result: the API shows seeds and generator only)."""
    import psycopg

    from tests.conftest import PG_ADMIN

    dsn = PG_ADMIN.replace("dbname=postgres", f"dbname={stack.pg_name}")
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT result FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]


def _events(stack: Stack, headers: dict[str, str], job_id: str) -> list[str]:
    r = requests.get(f"{stack.base_url}/v1/jobs/{job_id}/events", headers=headers, timeout=30)
    return [line.split(":", 1)[1].strip() for line in r.text.splitlines() if line.startswith("event:")]


def test_workers_load_models_once_at_start_and_report_them(stack: Stack) -> None:
    sdxl_log, wan_log = stack.log_tail("worker_sdxl"), stack.log_tail("worker_wan")
    assert "model ready:" in sdxl_log and "'family': 'sdxl'" in sdxl_log and "'device': 'cpu'" in sdxl_log
    assert "sdxl-tiny.safetensors'" in sdxl_log  # the single-file checkpoint
    assert "'family': 'wan'" in wan_log and "'family': 'enhancer'" in wan_log
    assert "'family': 'wan'" not in sdxl_log  # each worker loads its own family only
    text = requests.get(f"{stack.base_url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("orchestrator_model_parameters{")]
    for family in ("sdxl", "wan", "enhancer"):
        assert any(f'family="{family}"' in line and 'device="cpu"' in line for line in lines), lines
    assert "orchestrator_model_memory_bytes{" in text


def test_sdxl_job_uses_size_batch_seeds_negative_prompt_and_reports_progress(stack: Stack) -> None:
    _, headers = stack.user()
    r = stack.submit(headers, "sdxl_image_fast", prompt="a red kite in the sky", num_images=2,
                     seed=1234, negative_prompt="blurry watermark")
    assert r.status_code == 200, r.text
    job_id = r.json()["job"]["id"]
    job = stack.wait_for(headers, [job_id], timeout=120)[job_id]
    assert job["status"] == "completed", job
    assert len(job["assets"]) == 2
    pixels = []
    for asset in job["assets"]:
        img = Image.open(io.BytesIO(requests.get(asset["url"], timeout=10).content))
        assert (img.format, img.size) == ("PNG", (1024, 1024))
        pixels.append(img.tobytes())
    assert pixels[0] != pixels[1]  # two seeds, two pictures
    image = requests.get(f"{stack.base_url}/v1/images/{job['image_id']}", headers=headers, timeout=10).json()
    assert image["metadata"]["seeds"] == [1234, 1235]
    assert image["metadata"]["generator"] == "sdxl-diffusers"
    gen = _result(stack, job_id)
    assert gen["steps"] == 3 and gen["job_type_steps"] == 15
    assert (gen["width"], gen["height"], gen["guidance"]) == (1024, 1024, 6.0)
    assert "blurry watermark" in gen["negative_prompt"]
    assert gen["negative_embeds_norm"] > 0  # encoded, not SDXL's zeros for "no negative prompt"
    events = _events(stack, headers, job_id)
    assert events.count("job.progress") >= 2 and "job.completed" in events, events


def test_sdxl_diffusers_folder_through_a_worker(stack: Stack, models: dict[str, Path]) -> None:
    """The other SDXL format: the worker restarted on the diffusers folder (then back)."""
    def restart(**env: str) -> None:
        stack.kill("worker_sdxl", signal.SIGTERM)
        stack.env.update(env)
        stack.start("worker_sdxl")
        _wait_model_ready(stack, "worker_sdxl")

    restart(SDXL_MODEL_PATH=str(models["sdxl"]), SDXL_CONFIG_PATH="")
    try:
        assert f"'model': '{models['sdxl']}'" in stack.log_tail("worker_sdxl")
        _, headers = stack.user()
        job_id = stack.submit(headers, "sdxl_image_fast", prompt="a blue sea", num_images=1,
                              seed=99).json()["job"]["id"]
        job = stack.wait_for(headers, [job_id], timeout=120)[job_id]
        assert job["status"] == "completed", job
        img = Image.open(io.BytesIO(requests.get(job["assets"][0]["url"], timeout=10).content))
        assert (img.format, img.size) == ("PNG", (1024, 1024))
        assert _result(stack, job_id)["seeds"] == [99]
    finally:
        restart(SDXL_MODEL_PATH=str(models["sdxl_file"]), SDXL_CONFIG_PATH=str(models["sdxl_config"]))


def test_sdxl_cancel_stops_a_running_job(stack: Stack) -> None:
    _, headers = stack.user()
    job_id = stack.submit(headers, "sdxl_image_high", prompt="a cat", num_images=6).json()["job"]["id"]
    stack.wait_for(headers, [job_id], timeout=60, until=lambda j: j["status"] == "processing")
    r = requests.post(f"{stack.base_url}/v1/jobs/{job_id}/cancel", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while f"job {job_id} attempt 1 aborted" not in stack.log_tail("worker_sdxl"):
        assert time.monotonic() < deadline, stack.log_tail("worker_sdxl")
        time.sleep(0.2)
    job = stack.job(headers, job_id)
    assert job["status"] == "cancelled" and not job["assets"]


def test_wan_image_with_language_model_enhancer(stack: Stack) -> None:
    _, headers = stack.user()
    jobs = [stack.submit(headers, t, prompt="a green forest at night", seed=7).json()["job"]["id"]
            for t in ("image_fast", "image7b_fast_enhanced")]
    done = stack.wait_for(headers, jobs, timeout=120)
    for job_id in jobs:
        job = done[job_id]
        assert job["status"] == "completed", job
        img = Image.open(io.BytesIO(requests.get(job["assets"][0]["url"], timeout=10).content))
        assert (img.format, img.size) == ("PNG", (480, 832))
        gen = _result(stack, job_id)
        assert gen["seeds"] == [7] and gen["sample_solver"] == "unipc" and gen["sample_shift"] == 5.0
    enhanced = done[jobs[1]]
    assert enhanced["metadata"]["enhancement"] == {"backend": "transformers", "error": None}
    assert enhanced["enhanced_prompt"]


def test_wan_video_job_has_the_exact_shape(stack: Stack) -> None:
    """The real length and size: 83 frames at 480x832 (85 made), H.264 at 16 fps. About 25 s
    on one CPU core, nearly all of it the tiny VAE decoding 85 full-size frames."""
    from tests.helpers import mp4_info

    _, headers = stack.user()
    job_id = stack.submit(headers, "video_fast", prompt="a river at night", seed=5).json()["job"]["id"]
    job = stack.wait_for(headers, [job_id], timeout=600)[job_id]
    assert job["status"] == "completed", job
    data = requests.get(job["assets"][0]["url"], timeout=30).content
    assert mp4_info(data) == {"codec": "h264", "width": 480, "height": 832, "frames": 83, "fps": 16.0}
    assert job["thumbnail"] is not None
    assert _result(stack, job_id)["generated_frames"] == 85


def test_wan_video_frames_trimmed_to_request_and_encoded(models: dict[str, Path]) -> None:
    """In process, at a small size: WAN makes 4n+1 frames, so 6 asked are made as 9 and cut
    to 6, then H.264 at 16 fps; a cancel leaves the pipeline between steps."""
    from tasks.generators.diffusion import WanGenerator
    from tests.helpers import mp4_info

    gen = WanGenerator(models["wan"], device="cpu", max_steps=2)
    t = JOB_TYPES["video_fast"]
    spec = GenerationSpec(job_id="v", job_type=t.name, format="video", prompt="a river", negative_prompt=None,
                          width=64, height=96, steps=t.steps, guidance=t.guidance, frames=6, fps=16,
                          num_outputs=1, seed=3, expected_seconds=1, sample_solver="unipc", sample_shift=5.0)
    steps: list[tuple[int, int]] = []
    result = gen.generate(spec, lambda s, n: steps.append((s, n)))
    assert steps == [(1, 2), (2, 2)]
    assert mp4_info(result.files[0].data) == {"codec": "h264", "width": 64, "height": 96, "frames": 6,
                                              "fps": 16.0}
    assert result.metadata["generated_frames"] == 9 and result.thumbnail is not None

    class Cancelled(Exception):
        pass

    def cancel(step: int, total: int) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):  # the progress callback's exception leaves the pipeline untouched
        gen.generate(spec, cancel)


def test_sdxl_out_of_memory_fails_the_job_clearly(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.errors import GenerationError
    from tasks.generators.diffusion import SDXLGenerator

    gen = SDXLGenerator(models["sdxl"], device="cpu", max_steps=1)

    def oom(*_a: object, **_k: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gen.pipe, "encode_prompt", oom)
    t = JOB_TYPES["sdxl_image_fast"]
    spec = GenerationSpec(job_id="o", job_type=t.name, format="image", prompt="a cat", negative_prompt=None,
                          width=64, height=64, steps=1, guidance=6.0, frames=1, fps=16, num_outputs=1,
                          seed=1, expected_seconds=1)
    with pytest.raises(GenerationError, match="out of GPU memory"):
        gen.generate(spec, lambda s, n: None)


def test_sdxl_single_file_loads_the_folders_weights(models: dict[str, Path]) -> None:
    """The original-layout checkpoint, converted back by diffusers with the config folder
    (which has no weights), gives every component exactly the diffusers folder's weights."""
    from tasks.generators.diffusion import SDXLGenerator

    assert not list(models["sdxl_config"].rglob("*.safetensors"))
    folder = SDXLGenerator(models["sdxl"], device="cpu").pipe
    single = SDXLGenerator(models["sdxl_file"], config_path=models["sdxl_config"], device="cpu").pipe
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert dict(single.scheduler.config) == dict(folder.scheduler.config)
    assert single.tokenizer_2("a red kite").input_ids == folder.tokenizer_2("a red kite").input_ids


def test_sdxl_single_file_path_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file path goes to ``from_single_file`` (offline, with the local configs), a folder to
    ``from_pretrained``; a file without configs is refused before diffusers could look online."""
    import diffusers

    from orchestrator.errors import GenerationError
    from tasks.generators.diffusion import SDXLGenerator

    calls: list[tuple[str, dict]] = []

    class Loaded(Exception):
        pass

    def single(path: str, **kw: object) -> None:
        calls.append((path, kw))
        raise Loaded

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_single_file", single)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"0")
    config = tmp_path / "sdxl-config"
    with pytest.raises(GenerationError, match="SDXL_CONFIG_PATH"):
        SDXLGenerator(ckpt, device="cpu")
    config.mkdir()
    with pytest.raises(GenerationError, match="SDXL_CONFIG_PATH"):
        SDXLGenerator(ckpt, config_path=config, device="cpu")  # no model_index.json
    assert calls == []
    (config / "model_index.json").write_text("{}")
    with pytest.raises(Loaded):
        SDXLGenerator(ckpt, config_path=config, device="cpu")
    assert calls == [(str(ckpt), {"config": str(config), "torch_dtype": torch.float32,
                                  "local_files_only": True})]


def test_enhancer_failure_keeps_prompt_and_says_why(models: dict[str, Path]) -> None:
    from orchestrator.enhancer import TransformersEnhancer

    ok = TransformersEnhancer(str(models["lm"]), device="cpu", max_new_tokens=8)
    assert ok.enhance("a red kite", format="video", quality="high").error is None
    broken = TransformersEnhancer(str(models["sdxl"]), device="cpu")  # not a language model
    result = broken.enhance("a red kite", format="image", quality="fast")
    assert result.prompt == "a red kite" and result.error and "language model failed" in result.error


def test_model_settings_are_validated(tmp_path: Path) -> None:
    assert Settings.from_env({}).sdxl_backend == "procedural"
    with pytest.raises(ConfigurationError, match="SDXL_MODEL_PATH"):
        Settings.from_env({"SDXL_BACKEND": "diffusers"})
    with pytest.raises(ConfigurationError, match="WAN_MODEL_PATH"):
        Settings.from_env({"WAN_BACKEND": "diffusers", "WAN_MODEL_PATH": str(tmp_path / "nope")})
    with pytest.raises(ConfigurationError, match="SDXL_BACKEND"):
        Settings.from_env({"SDXL_BACKEND": "onnx"})
    with pytest.raises(ConfigurationError, match="ENHANCER_BACKEND"):
        Settings.from_env({"ENHANCER_BACKEND": "gpt"})
    with pytest.raises(ConfigurationError, match="MODEL_DTYPE"):
        Settings.from_env({"MODEL_DTYPE": "int3"})
    with pytest.raises(ConfigurationError, match="MODEL_DEVICE"):
        Settings.from_env({"MODEL_DEVICE": "tpu"})
    s = Settings.from_env({"SDXL_BACKEND": "diffusers", "SDXL_MODEL_PATH": str(tmp_path)})
    assert s.sdxl_model_path == tmp_path and s.sdxl_config_path is None  # a folder holds its configs


def test_single_file_sdxl_needs_a_local_config_folder(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"0")
    config = tmp_path / "config"
    single = {"SDXL_BACKEND": "diffusers", "SDXL_MODEL_PATH": str(ckpt)}
    with pytest.raises(ConfigurationError, match="SDXL_CONFIG_PATH must be set when SDXL_MODEL_PATH "
                                                 "is a single-file checkpoint"):
        Settings.from_env(single)
    with pytest.raises(ConfigurationError, match="SDXL_CONFIG_PATH: .* does not exist"):
        Settings.from_env({**single, "SDXL_CONFIG_PATH": str(config)})
    config.mkdir()
    with pytest.raises(ConfigurationError, match="SDXL_CONFIG_PATH: .*no readable model_index.json"):
        Settings.from_env({**single, "SDXL_CONFIG_PATH": str(config)})
    (config / "model_index.json").write_text("{}")
    s = Settings.from_env({**single, "SDXL_CONFIG_PATH": str(config)})
    assert (s.sdxl_model_path, s.sdxl_config_path) == (ckpt, config)
    # procedural ignores the model settings' shapes (it loads nothing)
    assert Settings.from_env({"SDXL_MODEL_PATH": str(ckpt)}).sdxl_backend == "procedural"
