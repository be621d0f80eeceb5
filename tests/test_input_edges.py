"""Inputs that once reached the database in forms it rejects: each is a clean 4xx."""
from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from orchestrator.tokens import mint_user_token

QUEUE = "/functions/v1/queue-job"


@pytest.mark.parametrize("raw", [
    b'{"jobType": "image_fast", "metadata": {"prompt": "cat", "x": NaN}}',
    b'{"jobType": "image_fast", "metadata": {"prompt": "cat", "x": Infinity}}',
    b'{"jobType": "image_fast", "metadata": {"prompt": "cat\\u0000dog"}}',
    b'{"jobType": "image_fast", "metadata": {"prompt": "cat\\U0000"}}',
    b'[1, 2, 3]',
    b'{"jobType": "image_fast", "metadata": "nope"}',
])
def test_unstorable_json_is_400(client: Any, make_user: Any, raw: bytes) -> None:
    _, headers = make_user()
    r = client.post(QUEUE, headers={**headers, "Content-Type": "application/json"}, data=raw)
    assert r.status_code == 400 and r.json["success"] is False


@pytest.mark.parametrize("spelling", ["urn:uuid:{}", "{{{}}}", "{}x", "hex"])
def test_odd_id_spellings_are_404(client: Any, make_user: Any, spelling: str) -> None:
    _, headers = make_user()
    job_id = client.post(QUEUE, headers=headers,
                         json={"jobType": "image_fast", "metadata": {"prompt": "a"}}).json["job"]["id"]
    odd = job_id.replace("-", "") if spelling == "hex" else spelling.format(job_id)
    for path in (f"/v1/jobs/{odd}", f"/v1/images/{odd}"):
        assert client.get(path, headers=headers).status_code == 404
    assert client.post(f"/v1/jobs/{odd}/cancel", headers=headers).status_code == 404


def test_uppercase_subject_is_the_same_user(client: Any, settings: Any) -> None:
    user_id = str(uuid.uuid4())
    upper = {"Authorization": f"Bearer {mint_user_token(settings, user_id.upper())}"}
    lower = {"Authorization": f"Bearer {mint_user_token(settings, user_id)}"}
    job = client.post(QUEUE, headers=upper, json={"jobType": "image_fast",
                                                  "metadata": {"prompt": "a"}}).json["job"]
    assert job["user_id"] == user_id
    assert client.get(f"/v1/jobs/{job['id']}", headers=lower).status_code == 200
    assert client.post(f"/v1/jobs/{job['id'].upper()}/cancel", headers=upper).status_code == 200


@pytest.mark.parametrize("query", ["limit=%C2%B2", "limit=" + "9" * 5000, "limit=0", "limit=-1",
                                   "cursor=" + base64.urlsafe_b64encode(
                                       f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}".encode()).decode(),
                                   "cursor=%00", "status=done", "job_type=video_ultra"])
def test_bad_list_parameters_are_400(client: Any, make_user: Any, query: str) -> None:
    _, headers = make_user()
    r = client.get(f"/v1/jobs?{query}", headers=headers)
    assert r.status_code == 400 and r.json["success"] is False


def test_busy_asset_row_cannot_be_reused(client: Any, make_user: Any) -> None:
    _, headers = make_user()
    image_id = client.post("/v1/images", headers=headers, json={"title": "x"}).json["id"]
    body = {"jobType": "image_fast", "imageId": image_id, "metadata": {"prompt": "a"}}
    first = client.post(QUEUE, headers=headers, json=body)
    assert first.status_code == 200
    second = client.post(QUEUE, headers=headers, json=body)
    assert second.status_code == 409
    assert client.get("/v1/me", headers=headers).json["token_balance"] == 99
    client.post(f"/v1/jobs/{first.json['job']['id']}/cancel", headers=headers)
    assert client.post(QUEUE, headers=headers, json=body).status_code == 200


def test_failed_callback_with_null_assets(client: Any, make_user: Any,
                                          worker_headers: dict[str, str]) -> None:
    _, headers = make_user()
    job_id = client.post(QUEUE, headers=headers, json={"jobType": "image_fast",
                                                       "metadata": {"prompt": "a"}}).json["job"]["id"]
    r = client.post("/functions/v1/job-callback", headers=worker_headers,
                    json={"job_id": job_id, "status": "failed", "assets": None,
                          "error_message": "out of memory"})
    assert r.status_code == 200 and r.json["status"] == "failed"
