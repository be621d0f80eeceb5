"""End to end with real processes: the Procfile's web, worker_sdxl and
worker_wan commands, started as subprocesses, on PostgreSQL + Redis and on the
embedded defaults (SQLite + the SQLAlchemy broker, no servers).
"""
from __future__ import annotations

import uuid
from typing import Iterator

import pytest
import requests

from orchestrator.config import DEV_JWT_SECRET, DEV_WORKER_TOKEN
from orchestrator.jobtypes import JOB_TYPES
from tests.helpers import mp4_info, png_info
from tests.stack import Stack, make_stack

pytestmark = pytest.mark.e2e

PROCESSES = ("web", "worker_sdxl", "worker_wan")


@pytest.fixture(scope="module", params=["postgres-redis", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = make_stack(request.param, tmp_path_factory.mktemp(f"e2e-{request.param}"), PROCESSES)
    with st.running():
        yield st


def _wait_terminal(stack: Stack, headers: dict[str, str], job_ids: list[str]) -> dict:
    return stack.wait_for(headers, job_ids, timeout=120)


def test_all_ten_job_types_complete(stack: Stack) -> None:
    user_id, headers = stack.user()
    submitted: dict[str, str] = {}
    for job_type in JOB_TYPES:
        r = requests.post(f"{stack.base_url}/functions/v1/queue-job", headers=headers, timeout=10,
                          json={"jobType": job_type,
                                "metadata": {"prompt": f"a lighthouse at dusk ({job_type})"}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True and body["jobType"] == job_type
        assert body["queue"] == f"{JOB_TYPES[job_type].family.value}_queue"
        submitted[body["job"]["id"]] = job_type

    jobs = _wait_terminal(stack, headers, list(submitted))
    for job_id, job in jobs.items():
        spec = JOB_TYPES[submitted[job_id]]
        assert job["status"] == "completed", job
        assert job["progress"] == 100 and job["attempts"] == 1
        assert len(job["assets"]) == spec.outputs
        if spec.enhanced:
            assert job["enhanced_prompt"] and job["enhanced_prompt"] != job["prompt"]
        for asset in job["assets"]:
            assert asset["bucket"] == spec.name and asset["path"].startswith(f"{user_id}/")
            download = requests.get(asset["url"], timeout=10)
            assert download.status_code == 200
            if spec.is_video:
                assert download.headers["Content-Type"] == "video/mp4"
                info = mp4_info(download.content)
                assert info == {"codec": "h264", "width": 480, "height": 832, "frames": 83,
                                "fps": 16.0}
            else:
                assert download.headers["Content-Type"] == "image/png"
                assert png_info(download.content) == ("PNG", (spec.width, spec.height))
        kind, asset_id = ("videos", job["video_id"]) if spec.is_video else ("images", job["image_id"])
        row = requests.get(f"{stack.base_url}/v1/{kind}/{asset_id}", headers=headers, timeout=10).json()
        assert row["status"] == "completed" and row["completed_at"]
        if spec.is_video:
            assert row["video_url"] == job["assets"][0]["path"] and row["thumbnail_url"]
        else:
            assert row["image_url"] == job["assets"][0]["path"]
    me = requests.get(f"{stack.base_url}/v1/me", headers=headers, timeout=10).json()
    assert me["token_balance"] == 100 - sum(t.credits for t in JOB_TYPES.values())
    _assert_logs_keep_secrets(stack, headers, jobs)


def _assert_logs_keep_secrets(stack: Stack, headers: dict[str, str], jobs: dict) -> None:
    """The access log names each request, but no token, secret or signed-link signature."""
    from urllib.parse import parse_qs, urlsplit

    logs = {name: (stack.logs / f"{name}.log").read_text(errors="replace") for name in stack.processes}
    assert "/functions/v1/queue-job" in logs["web"] and "/v1/files/" in logs["web"]
    secrets = {headers["Authorization"].split()[1], stack.env.get("WORKER_TOKEN") or DEV_WORKER_TOKEN,
               stack.env.get("JWT_SECRET") or DEV_JWT_SECRET}
    secrets |= {parse_qs(urlsplit(a["url"]).query)["sig"][0]
                for job in jobs.values() for a in job["assets"]}
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a secret appears in the {name} log"


def test_admin_image_is_generated_for_admins_only(stack: Stack) -> None:
    user_id, headers = stack.user()
    url = f"{stack.base_url}/functions/v1/generate-admin-image"
    r = requests.post(url, headers=headers, json={"prompt": "a test card"}, timeout=10)
    assert r.status_code == 403 and r.json()["success"] is False
    stack.cli("grant-admin", user_id)
    r = requests.post(url, headers=headers, json={"prompt": "a test card", "mode": "fast"}, timeout=90)
    assert r.status_code == 200, r.text
    image = r.json()["image"]
    assert image["prompt"] == "a test card" and image["mode"] == "fast" and image["id"]
    assert png_info(requests.get(image["url"], timeout=10).content) == ("PNG", (1024, 1024))


def test_auth_isolation_and_credits_over_http(stack: Stack) -> None:
    _, alice = stack.user()
    _, bob = stack.user()
    base = stack.base_url
    r = requests.post(f"{base}/functions/v1/queue-job", headers=alice, timeout=10,
                      json={"jobType": "image_fast", "metadata": {"prompt": "a boat"}})
    job_id = r.json()["job"]["id"]
    theirs = requests.get(f"{base}/v1/jobs/{job_id}", headers=bob, timeout=10)
    random = requests.get(f"{base}/v1/jobs/{uuid.uuid4()}", headers=bob, timeout=10)
    assert theirs.status_code == random.status_code == 404 and theirs.content == random.content
    assert requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).status_code == 401
    bad = requests.post(f"{base}/functions/v1/queue-job", timeout=10,
                        headers={"Authorization": "Bearer not-a-token"}, json={"jobType": "image_fast"})
    assert bad.status_code == 401 and bad.json()["success"] is False
    unknown = requests.post(f"{base}/functions/v1/queue-job", headers=alice, timeout=10,
                            json={"jobType": "video_ultra", "metadata": {"prompt": "x"}})
    assert unknown.status_code == 400 and set(unknown.json()["details"]["valid_job_types"]) == set(JOB_TYPES)
    cb = requests.post(f"{base}/functions/v1/job-callback", timeout=10,
                       json={"job_id": job_id, "status": "failed", "error_message": "x"})
    assert cb.status_code == 401
    _wait_terminal(stack, alice, [job_id])
    # Spend Bob's 100 credits on video7b_high_enhanced (6 each), then one more is refused.
    for _ in range(16):
        ok = requests.post(f"{base}/functions/v1/queue-job", headers=bob, timeout=10,
                           json={"jobType": "video7b_high_enhanced", "metadata": {"prompt": "rain"}})
        assert ok.status_code == 200, ok.text
    short = requests.post(f"{base}/functions/v1/queue-job", headers=bob, timeout=10,
                          json={"jobType": "video7b_high_enhanced", "metadata": {"prompt": "rain"}})
    assert short.status_code == 402 and short.json()["code"] == "insufficient_credits"
    assert requests.get(f"{base}/v1/me", headers=bob, timeout=10).json()["token_balance"] == 4
