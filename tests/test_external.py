"""External workers over HTTP (CONTRACT §3–§5), against a live service with
EXTERNAL_FAMILIES=sdxl,wan: web, the maintenance worker and beat on
PostgreSQL + Redis, no Celery GPU workers at all.

The old-style worker below is written from the contract alone: it pops the
legacy payload, uploads to the storage endpoint and reports bucket-relative
paths in both callback dialects.
"""
from __future__ import annotations

import http.client
import io
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from orchestrator.config import DEV_WORKER_TOKEN
from orchestrator.jobtypes import JOB_TYPES
from tests.helpers import mp4_info, png_info
from tests.stack import Stack, make_stack

pytestmark = pytest.mark.e2e

BASE = "/upstash"
WORKER = {"Authorization": f"Bearer {DEV_WORKER_TOKEN}"}
LEASE = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = make_stack("postgres-redis", tmp_path_factory.mktemp("external"),
                    ("web", "worker_maintenance", "beat"), redis_db=13,
                    EXTERNAL_FAMILIES="sdxl,wan", EXTERNAL_LEASE_SECONDS=str(LEASE),
                    QUEUE_BASE_PATH=BASE, RECONCILE_INTERVAL="1")
    with st.running():
        yield st


def _pop(stack: Stack, queue: str) -> dict[str, Any] | None:
    r = requests.post(f"{stack.base_url}{BASE}/rpop/{queue}", headers=WORKER, timeout=10)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    return json.loads(result) if result is not None else None


def _upload(stack: Stack, bucket: str, path: str, data: bytes | None,
            headers: dict[str, str] | None = None, **kw: Any) -> requests.Response:
    return requests.post(f"{stack.base_url}/storage/v1/object/{bucket}/{path}",
                         headers={**WORKER, **(headers or {})}, data=data, timeout=10, **kw)


def _raw_upload(stack: Stack, bucket: str, path: str, data: bytes) -> int:
    """An upload whose path reaches the server byte for byte (requests would
    normalise ``..`` away on the client)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(stack.env["PORT"]), timeout=10)
    try:
        conn.request("POST", f"/storage/v1/object/{bucket}/{path}", body=data,
                     headers={**WORKER, "Content-Type": "image/png"})
        return conn.getresponse().status
    finally:
        conn.close()


def _callback(stack: Stack, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{stack.base_url}/functions/v1/job-callback", headers=WORKER, json=body,
                         timeout=10)


def _fake_png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _fake_mp4() -> bytes:
    from tasks.generators.base import GenerationSpec
    from tasks.generators.procedural import ProceduralGenerator

    spec = GenerationSpec(job_id="sample", job_type="video_fast", format="video", prompt="x",
                          negative_prompt=None, width=480, height=832, steps=1, guidance=6.5,
                          frames=83, fps=16, num_outputs=1, seed=1, expected_seconds=1)
    return ProceduralGenerator().generate(spec, lambda *_: None).files[0].data


def test_old_style_worker_completes_all_ten_types(stack: Stack) -> None:
    user_id, headers = stack.user()
    submitted = {}
    for job_type in JOB_TYPES:
        r = stack.submit(headers, job_type, prompt=f"a red bicycle ({job_type})")
        assert r.status_code == 200, r.text
        submitted[r.json()["job"]["id"]] = job_type
    length = requests.get(f"{stack.base_url}{BASE}/llen/wan_queue", headers=WORKER, timeout=10)
    assert length.json() == {"result": 8}
    mp4 = _fake_mp4()
    legacy = True
    for queue in ("sdxl_queue", "wan_queue", "wan_queue"):
        while (job := _pop(stack, queue)) is not None:
            # The legacy payload of CONTRACT §3.
            assert job["type"] == submitted[job["id"]] and job["user_id"] == user_id
            assert job["bucket"] == job["type"] and job["prompt"].startswith("a red bicycle")
            cfg = job["config"]
            spec = JOB_TYPES[job["type"]]
            assert cfg["size"] == f"{spec.width}*{spec.height}" and cfg["sample_steps"] == spec.steps
            assert cfg["frame_num"] == spec.frames and cfg["num_images"] == spec.outputs
            assert cfg["enhance_prompt"] == spec.enhanced
            assert ("negative_prompt" in job) == spec.is_sdxl
            assert ("video_id" in job) == spec.is_video and ("image_id" in job) == (not spec.is_video)
            assert None not in (job.get("video_id", 1), job.get("image_id", 1))
            paths = []
            for i in range(spec.outputs):
                name = f"{job['id']}.mp4" if spec.is_video else f"{job['id']}_{i}.png"
                data = mp4 if spec.is_video else _fake_png(spec.width, spec.height)
                up = _upload(stack, job["bucket"], f"{user_id}/{name}", data)
                assert up.status_code == 200 and up.json() == {"Key": f"{job['bucket']}/{user_id}/{name}"}
                paths.append(f"{user_id}/{name}")
            if legacy:
                assert _callback(stack, {"jobId": job["id"], "status": "processing"}).status_code == 200
                body: dict[str, Any] = {"jobId": job["id"], "status": "completed"}
                if len(paths) > 1:
                    body["imageUrls"] = paths
                else:
                    body["filePath"] = paths[0]
                if spec.enhanced:
                    body["enhancedPrompt"] = job["prompt"] + ", golden hour"
            else:
                body = {"job_id": job["id"], "status": "completed", "attempt": job["attempt"],
                        "assets": [{"url": f"https://old-storage.example/storage/v1/object/public/"
                                           f"{job['bucket']}/{p}"} for p in paths]}
                if spec.enhanced:
                    body["enhanced_prompt"] = job["prompt"] + ", golden hour"
            done = _callback(stack, body)
            assert done.status_code == 200 and done.json()["status"] == "completed", done.text
            legacy = not legacy
    jobs = stack.wait_for(headers, list(submitted), timeout=30)
    for job_id, job in jobs.items():
        spec = JOB_TYPES[submitted[job_id]]
        assert job["status"] == "completed" and len(job["assets"]) == spec.outputs
        content = requests.get(job["assets"][0]["url"], timeout=10).content
        if spec.is_video:
            assert mp4_info(content)["frames"] == 83
        else:
            assert png_info(content) == ("PNG", (spec.width, spec.height))
        if spec.enhanced:
            assert job["enhanced_prompt"].endswith("golden hour")
        kind, asset_id = ("videos", job["video_id"]) if spec.is_video else ("images", job["image_id"])
        row = requests.get(f"{stack.base_url}/v1/{kind}/{asset_id}", headers=headers, timeout=10).json()
        assert row["status"] == "completed"


def test_two_workers_polling_claim_each_job_once(stack: Stack) -> None:
    user_id, headers = stack.user()
    stack.cli("grant-credits", user_id, "100")
    ids = {stack.submit(headers, "sdxl_image_fast").json()["job"]["id"] for _ in range(100)}
    claimed: list[list[str]] = [[], []]

    def poll(slot: int) -> None:
        while (job := _pop(stack, "sdxl_queue")) is not None:
            claimed[slot].append(job["id"])

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = claimed[0] + claimed[1]
    assert len(everything) == len(set(everything)) == 100 and set(everything) == ids
    assert claimed[0] and claimed[1], "both workers should have got work"
    for job_id in everything:  # finish them so later tests see an empty queue
        assert _callback(stack, {"job_id": job_id, "status": "failed",
                                 "error_message": "test"}).status_code == 200


def test_a_dead_workers_job_is_offered_again_and_its_late_callbacks_change_nothing(stack: Stack) -> None:
    user_id, headers = stack.user()
    job_id = stack.submit(headers, "image_fast").json()["job"]["id"]
    first = _pop(stack, "wan_queue")
    assert first is not None and first["id"] == job_id and first["attempt"] == 1
    # The worker dies: no callback. After its lease the job waits again.
    stack.wait_for(headers, [job_id], timeout=LEASE + 10, until=lambda j: j["status"] == "queued")
    second = _pop(stack, "wan_queue")
    assert second is not None and second["id"] == job_id and second["attempt"] == 2
    late = _callback(stack, {"job_id": job_id, "status": "completed", "attempt": 1,
                             "assets": [f"{user_id}/{job_id}_stale.png"]})
    assert late.status_code == 409
    assert stack.job(headers, job_id)["status"] == "processing"
    path = f"{user_id}/{job_id}_0.png"
    assert _upload(stack, "image_fast", path, _fake_png(480, 832)).status_code == 200
    ok = _callback(stack, {"job_id": job_id, "status": "completed", "attempt": 2, "assets": [path]})
    assert ok.status_code == 200
    after = _callback(stack, {"jobId": job_id, "status": "failed", "errorMessage": "late"})
    assert after.status_code == 200 and after.json()["status"] == "completed"
    job = stack.job(headers, job_id)
    assert job["status"] == "completed" and job["attempts"] == 2
    assert [a["path"] for a in job["assets"]] == [path]


def test_uploads_are_confined_to_a_leased_job(stack: Stack) -> None:
    user_id, headers = stack.user()
    job_id = stack.submit(headers, "image_fast").json()["job"]["id"]
    storage = Path(stack.env["VAR_DIR"]) / "storage"
    before = sorted(str(p) for p in storage.rglob("*"))
    png = _fake_png(8, 8)
    # Not leased yet: refused.
    assert _upload(stack, "image_fast", f"{user_id}/x.png", png).status_code == 403
    assert _pop(stack, "wan_queue")["id"] == job_id
    other = str(uuid.uuid4())
    cases = {
        f"{other}/x.png": 403,                      # another user's folder
        f"{user_id}/../{other}/x.png": 400,         # traversal
        f"{user_id}/%2e%2e/x.png": 400,             # percent-encoded traversal
        f"{user_id}/a%5cb.png": 400,                # backslash
        "x.png": 400,                               # no owner folder
    }
    for path, status in cases.items():
        assert _raw_upload(stack, "image_fast", path, png) == status, path
    assert _upload(stack, "no_such_bucket", f"{user_id}/x.png", png).status_code == 400
    assert _upload(stack, "video_fast", f"{user_id}/x.mp4", png).status_code == 403  # other bucket
    big = b"\0" * (JOB_TYPES["image_fast"].bucket_cap + 1)
    assert _upload(stack, "image_fast", f"{user_id}/big.png", big).status_code == 413
    assert sorted(str(p) for p in storage.rglob("*")) == before
    ok = _upload(stack, "image_fast", f"{user_id}/ok.png", None, files={"file": ("ok.png", png)})
    assert ok.status_code == 200
    # Files larger than the API's 1 MB JSON cap are fine up to the bucket's cap.
    large = b"\x89PNG" + b"\1" * (3 * 1024 * 1024)
    assert _upload(stack, "image_fast", f"{user_id}/large.png", large).status_code == 200
    assert _upload(stack, "image_fast", f"{user_id}/large2.png", None,
                   files={"file": ("large2.png", large)}).status_code == 200
    assert (storage / "image_fast" / user_id / "large2.png").stat().st_size == len(large)
    assert _upload(stack, "image_fast", f"{user_id}/ok.png", png).status_code == 409
    assert _upload(stack, "image_fast", f"{user_id}/ok.png", png,
                   headers={"x-upsert": "true"}).status_code == 200
    _callback(stack, {"job_id": job_id, "status": "failed", "error_message": "done"})


def test_queue_endpoints_need_the_worker_credential(stack: Stack) -> None:
    _, headers = stack.user()
    for method, path in (("post", f"{BASE}/rpop/wan_queue"), ("get", f"{BASE}/llen/wan_queue"),
                         ("post", "/storage/v1/object/image_fast/x/y.png")):
        for creds in ({}, headers, {"Authorization": "Bearer wrong"}):
            r = getattr(requests, method)(f"{stack.base_url}{path}", headers=creds, timeout=10)
            assert r.status_code == 401, (path, creds)
    r = requests.post(f"{stack.base_url}{BASE}/rpop/other_queue", headers=WORKER, timeout=10)
    assert r.status_code == 404


def test_reference_worker_completes_jobs(stack: Stack) -> None:
    """examples/external_worker.py, as a separate program, drains both lists."""
    import subprocess
    import sys

    from tests.stack import ROOT

    user_id, headers = stack.user()
    ids = [stack.submit(headers, t).json()["job"]["id"]
           for t in ("sdxl_image_high", "video7b_fast_enhanced", "image_fast")]
    for queue in ("sdxl_queue", "wan_queue"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "external_worker.py"), "--url", stack.base_url,
             "--token", DEV_WORKER_TOKEN, "--queue", queue, "--base-path", BASE, "--once"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    jobs = stack.wait_for(headers, ids, timeout=30)
    for job in jobs.values():
        assert job["status"] == "completed", job
        assert len(job["assets"]) == JOB_TYPES[job["job_type"]].outputs
    video = jobs[ids[1]]
    assert video["enhanced_prompt"] and video["thumbnail"] is not None
    assert mp4_info(requests.get(video["assets"][0]["url"], timeout=10).content)["frames"] == 83


def test_lpush_gives_a_leased_job_back(stack: Stack) -> None:
    _, headers = stack.user()
    job_id = stack.submit(headers, "image_high").json()["job"]["id"]
    job = _pop(stack, "wan_queue")
    assert job is not None and job["id"] == job_id
    image = f"{stack.base_url}/v1/images/{job['image_id']}"
    assert requests.get(image, headers=headers, timeout=10).json()["status"] == "generating"
    back = requests.post(f"{stack.base_url}{BASE}/lpush/wan_queue", headers=WORKER,
                         data=json.dumps(job), timeout=10)
    assert back.status_code == 200 and back.json() == {"result": 1}
    assert stack.job(headers, job_id)["status"] == "queued"
    assert requests.get(image, headers=headers, timeout=10).json()["status"] == "queued"
    again = requests.post(f"{stack.base_url}{BASE}/lpush/wan_queue", headers=WORKER,
                          data=job_id, timeout=10)
    assert again.status_code == 409
    junk = requests.post(f"{stack.base_url}{BASE}/lpush/wan_queue", headers=WORKER,
                         data='{"type": "image_fast", "prompt": "free job"}', timeout=10)
    assert junk.status_code == 400
    assert _pop(stack, "wan_queue")["attempt"] == 2
    _callback(stack, {"job_id": job_id, "status": "failed", "error_message": "done"})
