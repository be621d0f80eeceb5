"""The REST API under /v1 and queue-job's request/response rules (CONTRACT §2)."""
from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any, Callable

import pytest
from sqlalchemy import func, select, update

from orchestrator.models import CreditEntry, Image, Job, Profile, Project, Video
from tests.helpers import assert_json_error, balance, wait_until

QUEUE = "/functions/v1/queue-job"

TEN_TYPES = {
    "sdxl_image_fast", "sdxl_image_high", "image_fast", "image_high", "video_fast", "video_high",
    "image7b_fast_enhanced", "image7b_high_enhanced", "video7b_fast_enhanced", "video7b_high_enhanced",
}

JOB_FIELDS = {
    "id", "user_id", "job_type", "status", "format", "quality", "model_variant", "queue", "prompt",
    "negative_prompt", "enhanced_prompt", "metadata", "project_id", "image_id", "video_id",
    "progress", "attempts", "max_attempts", "error_message", "created_at", "started_at",
    "completed_at", "assets",
}


# --- helpers --------------------------------------------------------------------------------


def queue(client: Any, headers: dict[str, str], job_type: str = "sdxl_image_fast",
          prompt: str | None = "a red fox in snow", **extra: Any) -> Any:
    body: dict[str, Any] = {"jobType": job_type, **extra}
    if prompt is not None:
        body.setdefault("metadata", {})["prompt"] = prompt
    return client.post(QUEUE, json=body, headers=headers)


def queued_job(client: Any, headers: dict[str, str], job_type: str = "sdxl_image_fast",
               prompt: str | None = "a red fox in snow", **extra: Any) -> dict[str, Any]:
    resp = queue(client, headers, job_type, prompt, **extra)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["job"]






def count(db: Any, model: Any, user_id: str) -> int:
    with db.session() as s:
        return s.execute(select(func.count()).select_from(model)
                         .where(model.user_id == user_id)).scalar_one()


def refund_count(db: Any, job_id: str) -> int:
    with db.session() as s:
        return s.execute(select(func.count()).select_from(CreditEntry).where(
            CreditEntry.job_id == job_id, CreditEntry.reason == "job_refund")).scalar_one()


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- GET /v1/jobs/<id> ----------------------------------------------------------------------


def test_get_job_record(client: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queued_job(client, headers, metadata={"prompt": "a red fox in snow", "style": "ink"})
    resp = client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    record = resp.get_json()
    assert JOB_FIELDS <= set(record), JOB_FIELDS - set(record)
    assert record["id"] == job["id"]
    assert record["user_id"] == user_id
    assert record["job_type"] == "sdxl_image_fast"
    assert record["status"] == "queued"
    assert record["format"] == "image"
    assert record["quality"] == "fast"
    assert record["model_variant"] == "lustify_sdxl"
    assert record["queue"] in ("sdxl", "sdxl_queue")
    assert record["prompt"] == "a red fox in snow"
    assert isinstance(record["negative_prompt"], str) and record["negative_prompt"]
    assert record["enhanced_prompt"] is None
    assert record["metadata"]["style"] == "ink"
    assert record["metadata"]["prompt"] == "a red fox in snow"
    assert record["project_id"] is None
    assert record["image_id"] and record["video_id"] is None
    assert record["progress"] == 0
    assert record["attempts"] == 0
    assert record["max_attempts"] >= 1
    assert record["error_message"] is None
    created = parse_time(record["created_at"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 120
    assert record["started_at"] is None and record["completed_at"] is None
    assert record["assets"] == []
    # the queue-job answer carried the same record
    assert {k: job[k] for k in JOB_FIELDS if k != "created_at"} == \
        {k: record[k] for k in JOB_FIELDS if k != "created_at"}


# --- GET /v1/jobs ---------------------------------------------------------------------------


def test_list_jobs_newest_first_filters_and_pagination(client: Any, worker_headers: dict[str, str],
                                                       make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    types = ["sdxl_image_fast", "image_fast", "video_fast", "sdxl_image_fast", "image_fast"]
    created = [queued_job(client, headers, t, prompt=f"prompt {i}")["id"] for i, t in enumerate(types)]
    # one of them completed, one cancelled
    done = client.post("/functions/v1/job-callback", headers=worker_headers, json={
        "job_id": created[1], "status": "completed", "assets": [f"{user_id}/x.png"]})
    assert done.status_code == 200
    assert client.post(f"/v1/jobs/{created[2]}/cancel", headers=headers).status_code == 200

    resp = client.get("/v1/jobs", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    listed = resp.get_json()["jobs"]
    assert [j["id"] for j in listed] == list(reversed(created))
    stamps = [parse_time(j["created_at"]) for j in listed]
    assert stamps == sorted(stamps, reverse=True)

    by_status = client.get("/v1/jobs?status=queued", headers=headers).get_json()["jobs"]
    assert [j["id"] for j in by_status] == [created[4], created[3], created[0]]
    assert all(j["status"] == "queued" for j in by_status)
    completed = client.get("/v1/jobs?status=completed", headers=headers).get_json()["jobs"]
    assert [j["id"] for j in completed] == [created[1]]
    cancelled = client.get("/v1/jobs?status=cancelled", headers=headers).get_json()["jobs"]
    assert [j["id"] for j in cancelled] == [created[2]]

    sdxl = client.get("/v1/jobs?job_type=sdxl_image_fast", headers=headers).get_json()["jobs"]
    assert [j["id"] for j in sdxl] == [created[3], created[0]]
    both = client.get("/v1/jobs?job_type=image_fast&status=queued", headers=headers).get_json()["jobs"]
    assert [j["id"] for j in both] == [created[4]]
    none = client.get("/v1/jobs?job_type=video_high", headers=headers).get_json()
    assert none["jobs"] == [] and none["next_cursor"] is None

    for limit in (1, 2, 3, 5):
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            url = f"/v1/jobs?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            page = client.get(url, headers=headers)
            assert page.status_code == 200, page.get_data(as_text=True)
            data = page.get_json()
            assert 0 < len(data["jobs"]) <= limit
            seen.extend(j["id"] for j in data["jobs"])
            pages += 1
            cursor = data["next_cursor"]
            if not cursor:
                break
            assert pages <= 10
        assert seen == list(reversed(created)), limit
        assert len(set(seen)) == len(seen)
        assert pages == -(-len(created) // limit)

    # pagination composes with a filter
    first = client.get("/v1/jobs?status=queued&limit=2", headers=headers).get_json()
    assert [j["id"] for j in first["jobs"]] == [created[4], created[3]]
    rest = client.get(f"/v1/jobs?status=queued&limit=2&cursor={first['next_cursor']}",
                      headers=headers).get_json()
    assert [j["id"] for j in rest["jobs"]] == [created[0]]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize("query", [
    "limit=abc", "limit=0", "limit=-1", "limit=101", "limit=1.5", "limit=99999999999999999999",
    "status=bogus", "status=QUEUED", "job_type=nope", "cursor=!!!", "cursor=abc",
    "cursor=bm90LWEtY3Vyc29y",  # base64 of "not-a-cursor"
])
def test_list_jobs_bad_query_is_400(client: Any, make_user: Callable[..., Any], query: str) -> None:
    _, headers = make_user()
    queued_job(client, headers)
    assert_json_error(client.get(f"/v1/jobs?{query}", headers=headers), 400)


# --- isolation between users ----------------------------------------------------------------


@pytest.mark.parametrize("resource", ["job", "image", "video", "project", "cancel"])
def test_other_users_rows_are_indistinguishable_from_missing(client: Any, db: Any,
                                                             make_user: Callable[..., Any],
                                                             resource: str) -> None:
    a_id, a = make_user()
    _, b = make_user()
    img_job = queued_job(client, a, "sdxl_image_fast")
    vid_job = queued_job(client, a, "video_fast")
    project = client.post("/v1/projects", json={"title": "A's", "original_prompt": "p"}, headers=a)
    assert project.status_code == 201
    project_id = project.get_json()["id"]

    owned_url, template, method = {
        "job": (f"/v1/jobs/{img_job['id']}", "/v1/jobs/{}", "get"),
        "image": (f"/v1/images/{img_job['image_id']}", "/v1/images/{}", "get"),
        "video": (f"/v1/videos/{vid_job['video_id']}", "/v1/videos/{}", "get"),
        "project": (f"/v1/projects/{project_id}", "/v1/projects/{}", "get"),
        "cancel": (f"/v1/jobs/{img_job['id']}/cancel", "/v1/jobs/{}/cancel", "post"),
    }[resource]
    call = getattr(client, method)
    theirs = call(owned_url, headers=b)
    missing = call(template.format(uuid.uuid4()), headers=b)
    garbage = call(template.format("not-a-uuid"), headers=b)
    for resp in (theirs, missing, garbage):
        assert_json_error(resp, 404)
        assert resp.get_json()["code"] == "not_found"
    assert theirs.get_data() == missing.get_data() == garbage.get_data()

    # B's attempt changed nothing: A's job is still queued and still charged
    assert client.get(f"/v1/jobs/{img_job['id']}", headers=a).get_json()["status"] == "queued"
    assert balance(client, a) == 100 - 1 - 3
    # and the owner does see it
    assert call(owned_url, headers=a).status_code == 200
    assert client.get("/v1/jobs", headers=b).get_json()["jobs"] == []
    assert {j["id"] for j in client.get("/v1/jobs", headers=a).get_json()["jobs"]} == \
        {img_job["id"], vid_job["id"]}
    assert count(db, Job, a_id) == 2


def test_list_never_shows_other_users_jobs(client: Any, make_user: Callable[..., Any]) -> None:
    _, a = make_user()
    b_id, b = make_user()
    a_ids = {queued_job(client, a)["id"] for _ in range(3)}
    b_ids = {queued_job(client, b)["id"]}
    for query in ("", "?status=queued", "?job_type=sdxl_image_fast", "?limit=1"):
        listed = client.get(f"/v1/jobs{query}", headers=b).get_json()["jobs"]
        assert {j["id"] for j in listed} <= b_ids
        assert not {j["id"] for j in listed} & a_ids
        assert all(j["user_id"] == b_id for j in listed)


def test_cannot_use_another_users_project_or_image(client: Any, db: Any,
                                                   make_user: Callable[..., Any]) -> None:
    _, a = make_user()
    b_id, b = make_user()
    project_id = client.post("/v1/projects", json={"original_prompt": "secret prompt"},
                             headers=a).get_json()["id"]
    image_id = client.post("/v1/images", json={"title": "a"}, headers=a).get_json()["id"]
    assert_json_error(queue(client, b, prompt=None, projectId=project_id), 404)
    assert_json_error(queue(client, b, imageId=image_id), 404)
    assert count(db, Job, b_id) == 0
    assert balance(client, b) == 100


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_queued_job_refunds_once(client: Any, db: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    job = queued_job(client, headers, "video_fast")  # 3 credits
    assert balance(client, headers) == 97
    first = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.get_json()["status"] == "cancelled"
    assert first.get_json()["completed_at"] is not None
    assert balance(client, headers) == 100
    assert refund_count(db, job["id"]) == 1
    video = client.get(f"/v1/videos/{job['video_id']}", headers=headers).get_json()
    assert video["status"] == "failed"

    second = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert second.status_code == 200, second.get_data(as_text=True)
    assert second.get_json()["status"] == "cancelled"
    assert balance(client, headers) == 100
    assert refund_count(db, job["id"]) == 1
    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).get_json()["status"] == "cancelled"


def test_cancel_processing_job(client: Any, db: Any, worker_headers: dict[str, str],
                               make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    job = queued_job(client, headers)
    assert client.post("/functions/v1/job-callback", headers=worker_headers,
                       json={"job_id": job["id"], "status": "processing"}).status_code == 200
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
    assert resp.status_code == 200
    assert resp.get_json()["status"] == "cancelled"
    assert client.get(f"/v1/images/{job['image_id']}", headers=headers).get_json()["status"] == "failed"
    assert balance(client, headers) == 100


def test_cancel_completed_job_is_409(client: Any, db: Any, worker_headers: dict[str, str],
                                     make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    job = queued_job(client, headers)
    done = client.post("/functions/v1/job-callback", headers=worker_headers, json={
        "job_id": job["id"], "status": "completed", "assets": [f"{user_id}/done.png"]})
    assert done.status_code == 200
    body = assert_json_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers), 409)
    assert body["code"] == "conflict"
    assert client.get(f"/v1/jobs/{job['id']}", headers=headers).get_json()["status"] == "completed"
    assert balance(client, headers) == 99
    assert refund_count(db, job["id"]) == 0


def test_cancel_failed_job_is_409_and_no_second_refund(client: Any, db: Any,
                                                       worker_headers: dict[str, str],
                                                       make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    job = queued_job(client, headers)
    client.post("/functions/v1/job-callback", headers=worker_headers,
                json={"job_id": job["id"], "status": "failed", "error_message": "x"})
    assert balance(client, headers) == 100
    assert_json_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=headers), 409)
    assert balance(client, headers) == 100
    assert refund_count(db, job["id"]) == 1


# --- /v1/me and credits ---------------------------------------------------------------------


def test_me_for_new_user(client: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    resp = client.get("/v1/me", headers=headers)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["user_id"] == user_id
    assert body["token_balance"] == 100
    assert body["roles"] == []


def test_me_balance_tracks_charges(client: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    queued_job(client, headers, "sdxl_image_high")  # 2
    queued_job(client, headers, "video7b_high_enhanced")  # 6
    assert balance(client, headers) == 92


def test_insufficient_credits_is_402_and_creates_nothing(client: Any, db: Any,
                                                         make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    assert balance(client, headers) == 100  # creates the profile
    with db.transaction() as s:
        s.execute(update(Profile).where(Profile.id == user_id).values(token_balance=1))
    assert balance(client, headers) == 1

    resp = queue(client, headers, "video_high")  # 5 credits
    body = assert_json_error(resp, 402)
    assert body["code"] == "insufficient_credits"
    assert count(db, Job, user_id) == 0
    assert count(db, Video, user_id) == 0
    assert count(db, Image, user_id) == 0
    assert count(db, CreditEntry, user_id) == 0
    assert balance(client, headers) == 1

    # exactly enough still works
    ok = queue(client, headers, "sdxl_image_fast")  # 1 credit
    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert balance(client, headers) == 0
    assert_json_error(queue(client, headers, "sdxl_image_fast"), 402)
    assert count(db, Job, user_id) == 1


# --- projects and pre-created assets ---------------------------------------------------------


def test_project_enhanced_prompt_wins(client: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    resp = client.post("/v1/projects", headers=headers, json={
        "title": "Harbour", "original_prompt": "a harbour", "enhanced_prompt": "a misty harbour at dawn"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    project = resp.get_json()
    job = queued_job(client, headers, "image_fast", prompt=None, projectId=project["id"])
    assert job["prompt"] == "a misty harbour at dawn"
    assert job["project_id"] == project["id"]
    # even when metadata.prompt is present, the project's prompt comes first
    job2 = queued_job(client, headers, "image_fast", prompt="ignored", projectId=project["id"])
    assert job2["prompt"] == "a misty harbour at dawn"


def test_project_original_prompt_used_without_enhanced(client: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    project = client.post("/v1/projects", headers=headers,
                          json={"title": "Fox", "original_prompt": "a fox"}).get_json()
    job = queued_job(client, headers, "sdxl_image_fast", prompt=None, projectId=project["id"])
    assert job["prompt"] == "a fox"


def test_no_prompt_anywhere_is_400(client: Any, db: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    project = client.post("/v1/projects", headers=headers, json={"title": "empty"}).get_json()
    assert_json_error(queue(client, headers, prompt=None, projectId=project["id"]), 400)
    assert_json_error(queue(client, headers, prompt=None), 400)
    assert_json_error(queue(client, headers, prompt="   "), 400)
    assert count(db, Job, user_id) == 0


def test_unknown_project_is_404(client: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    assert_json_error(queue(client, headers, prompt=None, projectId=str(uuid.uuid4())), 404)
    assert_json_error(queue(client, headers, projectId="not-a-uuid"), 400)


def test_precreated_image_is_reused(client: Any, db: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    resp = client.post("/v1/images", json={"title": "pre", "prompt": "pre"}, headers=headers)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    image_id = resp.get_json()["id"]
    assert count(db, Image, user_id) == 1
    job = queued_job(client, headers, "sdxl_image_fast", imageId=image_id)
    assert job["image_id"] == image_id
    assert count(db, Image, user_id) == 1
    with db.session() as s:
        assert s.get(Job, job["id"]).image_id == image_id
        assert s.get(Image, image_id).status == "queued"


def test_precreated_video_is_reused(client: Any, db: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    video_id = client.post("/v1/videos", json={"title": "pre"}, headers=headers).get_json()["id"]
    job = queued_job(client, headers, "video_fast", videoId=video_id)
    assert job["video_id"] == video_id and job["image_id"] is None
    assert count(db, Video, user_id) == 1
    assert count(db, Image, user_id) == 0


@pytest.mark.parametrize("job_type,field", [("video_fast", "imageId"), ("video7b_high_enhanced", "imageId"),
                                            ("sdxl_image_fast", "videoId"), ("image_high", "videoId")])
def test_asset_id_of_wrong_kind_is_400(client: Any, db: Any, make_user: Callable[..., Any],
                                       job_type: str, field: str) -> None:
    user_id, headers = make_user()
    kind = "images" if field == "imageId" else "videos"
    asset_id = client.post(f"/v1/{kind}", json={"title": "pre"}, headers=headers).get_json()["id"]
    body = assert_json_error(queue(client, headers, job_type, **{field: asset_id}), 400)
    assert body["code"] == "invalid_request"
    assert count(db, Job, user_id) == 0
    assert balance(client, headers) == 100


# --- admin, job types, negative prompts -----------------------------------------------------


def test_generate_admin_image_requires_admin(client: Any, db: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    resp = client.post("/functions/v1/generate-admin-image", json={"prompt": "a castle"}, headers=headers)
    body = assert_json_error(resp, 403)
    assert body["code"] == "forbidden"
    assert count(db, Job, user_id) == 0
    # a role claim in the token does not make anyone an admin
    user2, forged = make_user(user_role="admin", roles=["admin"], app_metadata={"role": "admin"})
    assert_json_error(client.post("/functions/v1/generate-admin-image", json={"prompt": "x"},
                                  headers=forged), 403)
    assert count(db, Job, user2) == 0


def test_unknown_job_type_lists_the_ten(client: Any, db: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    for bad in ("image_ultra", "sdxl_video_fast", "IMAGE_FAST", "image7b_fast"):
        body = assert_json_error(queue(client, headers, bad), 400)
        details = body["details"]
        valid = details["valid_job_types"] if isinstance(details, dict) else details
        assert set(valid) == TEN_TYPES and len(valid) == 10
    assert count(db, Job, user_id) == 0
    assert balance(client, headers) == 100


@pytest.mark.parametrize("body", [
    {}, {"jobType": ""}, {"jobType": 5}, {"jobType": "image_fast", "metadata": "x"},
    {"jobType": "image_fast", "metadata": {"prompt": 7}},
])
def test_bad_queue_job_body_is_400(client: Any, db: Any, make_user: Callable[..., Any],
                                   body: dict[str, Any]) -> None:
    user_id, headers = make_user()
    assert_json_error(client.post(QUEUE, json=body, headers=headers), 400)
    assert count(db, Job, user_id) == 0


@pytest.mark.parametrize("raw", [b"not json", b"[]", b"null"])
def test_non_json_queue_job_is_400(client: Any, make_user: Callable[..., Any], raw: bytes) -> None:
    _, headers = make_user()
    resp = client.post(QUEUE, data=raw, headers={**headers, "Content-Type": "application/json"})
    assert_json_error(resp, 400)


@pytest.mark.parametrize("job_type", sorted(TEN_TYPES))
def test_negative_prompt_only_for_sdxl(client: Any, make_user: Callable[..., Any], job_type: str) -> None:
    _, headers = make_user()
    resp = queue(client, headers, job_type, prompt="a woman and a man walking on a beach")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    job = body["job"]
    if job_type.startswith("sdxl_"):
        assert isinstance(job["negative_prompt"], str) and job["negative_prompt"].strip()
        assert body["isSDXL"] is True and body["negativePromptSupported"] is True
    else:
        assert job["negative_prompt"] is None
        assert body["isSDXL"] is False and body["negativePromptSupported"] is False
    assert body["jobType"] == job_type
    assert job["job_type"] == job_type


# --- the queue-job answer and the broker ----------------------------------------------------


def test_queue_job_success_body(client: Any, make_user: Callable[..., Any]) -> None:
    user_id, headers = make_user()
    resp = queue(client, headers, "sdxl_image_high")
    assert resp.status_code == 200
    body = resp.get_json()
    for key in ("success", "job", "message", "queueLength", "modelVariant", "jobType", "queue",
                "isSDXL", "negativePromptSupported", "debug"):
        assert key in body, key
    assert body["success"] is True
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["queueLength"], int) and body["queueLength"] >= 1
    assert body["modelVariant"] == "lustify_sdxl"
    assert body["jobType"] == "sdxl_image_high"
    assert body["queue"] == "sdxl_queue"
    assert body["isSDXL"] is True
    assert body["negativePromptSupported"] is True
    debug = body["debug"]
    assert debug["userId"] == user_id
    assert debug["hasPrompt"] is True
    assert debug["redisConfigured"] is True
    assert abs((dt.datetime.now(dt.timezone.utc) - parse_time(debug["timestamp"])).total_seconds()) < 120
    assert body["job"]["status"] == "queued"
    assert body["job"]["user_id"] == user_id

    wan = queue(client, headers, "video_fast").get_json()
    assert wan["queue"] == "wan_queue"
    assert wan["modelVariant"] == "wan_2_1_1_3b"
    assert wan["isSDXL"] is False


def test_queue_length_counts_waiting_jobs_of_the_family(client: Any, make_user: Callable[..., Any]) -> None:
    _, headers = make_user()
    first = queue(client, headers, "sdxl_image_fast").get_json()["queueLength"]
    second = queue(client, headers, "sdxl_image_high").get_json()["queueLength"]
    assert second == first + 1
    wan = queue(client, headers, "image_fast").get_json()["queueLength"]
    assert wan == 1


def test_celery_message_reaches_redis(client: Any, redis_client: Any,
                                      make_user: Callable[..., Any]) -> None:
    redis_client.flushdb()
    _, headers = make_user()
    assert redis_client.llen("sdxl") == 0
    job = queued_job(client, headers, "sdxl_image_fast")
    assert redis_client.llen("sdxl") == 1
    assert redis_client.llen("wan") == 0
    message = json.loads(redis_client.lindex("sdxl", 0))
    assert message["headers"]["id"] == job["id"]
    assert message["headers"]["task"] == "generation.run"
    assert job["id"] in message["headers"]["argsrepr"]

    wan_job = queued_job(client, headers, "video_fast")
    assert redis_client.llen("wan") == 1
    assert redis_client.llen("sdxl") == 1
    assert json.loads(redis_client.lindex("wan", 0))["headers"]["id"] == wan_job["id"]
    # dispatch was recorded after the publish (in the web process's next batch of marks)
    assert wait_until(lambda: client.get(f"/v1/jobs/{job['id']}", headers=headers)
                      .get_json().get("dispatched_at"))


def test_publish_after_broker_flush_still_reaches_queue(client: Any, redis_client: Any,
                                                        make_user: Callable[..., Any]) -> None:
    """A Redis restart without persistence (or a FLUSHDB) removes kombu's binding sets.
    A job answered 200 must still be in its queue, not silently routed nowhere
    (CONTRACT §2: the broker takes the job, or the client gets a 503)."""
    _, headers = make_user()
    queued_job(client, headers, "sdxl_image_fast")  # the publisher has now declared its queues
    redis_client.flushdb()
    resp = queue(client, headers, "sdxl_image_fast")
    assert resp.status_code == 200
    job = resp.get_json()["job"]
    assert redis_client.llen("sdxl") == 1, "job answered 200 but its message was dropped"
    message = json.loads(redis_client.lindex("sdxl", 0))
    assert message["headers"]["id"] == job["id"]
