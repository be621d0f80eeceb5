#!/usr/bin/env python3
"""Reference external GPU worker: the template for a real one.

It speaks only the service's HTTP protocol (CONTRACT §3–§5): no database, no
Celery. It leases a job with ``rpop``, reports ``processing`` (which renews the
lease) while it works, uploads its files to the storage endpoint and reports
``completed`` (or ``failed``) with the paths relative to the bucket.
Generation here is the procedural generator; a real worker swaps in its model.

    python examples/external_worker.py --url http://127.0.0.1:8000 \\
        --token "$WORKER_TOKEN" --queue wan_queue [--base-path /upstash] [--once]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.enhancer import RuleBasedEnhancer  # noqa: E402
from tasks.generators.base import GenerationSpec  # noqa: E402
from tasks.generators.procedural import ProceduralGenerator  # noqa: E402

HEARTBEAT_S = 5.0


class Worker:
    def __init__(self, url: str, token: str, base_path: str = "", time_scale: float = 0.0) -> None:
        self.url = url.rstrip("/")
        self.queue_url = self.url + base_path.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.generator = ProceduralGenerator()
        self.enhancer = RuleBasedEnhancer()
        self.time_scale = time_scale

    def pop(self, queue: str) -> dict[str, Any] | None:
        r = self.session.post(f"{self.queue_url}/rpop/{queue}", timeout=30)
        r.raise_for_status()
        result = r.json()["result"]
        return json.loads(result) if result else None

    def callback(self, body: dict[str, Any]) -> requests.Response:
        return self.session.post(f"{self.url}/functions/v1/job-callback", json=body, timeout=30)

    def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> None:
        r = self.session.post(f"{self.url}/storage/v1/object/{bucket}/{path}", data=data,
                              headers={"Content-Type": content_type, "x-upsert": "true"},
                              timeout=120)
        r.raise_for_status()

    def run_one(self, job: dict[str, Any]) -> None:
        job_id, attempt, cfg = job["id"], job.get("attempt"), job["config"]
        self.callback({"job_id": job_id, "status": "processing", "attempt": attempt})
        last_beat = time.monotonic()

        def progress(step: int, total: int) -> None:
            nonlocal last_beat
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                r = self.callback({"job_id": job_id, "status": "processing", "attempt": attempt})
                if r.status_code == 409:  # lease lost: someone else owns the job now
                    raise RuntimeError("lease lost")
                last_beat = time.monotonic()

        try:
            prompt = job["prompt"]
            enhanced = None
            if cfg.get("enhance_prompt"):
                enhanced = self.enhancer.enhance(
                    prompt, format="video" if cfg["content_type"] == "video/mp4" else "image",
                    quality="fast" if "_fast" in job["type"] else "high").prompt
            width, height = (int(v) for v in cfg["size"].split("*"))
            spec = GenerationSpec(
                job_id=job_id, job_type=job["type"],
                format="video" if cfg["content_type"] == "video/mp4" else "image",
                prompt=enhanced or prompt, negative_prompt=job.get("negative_prompt"),
                width=width, height=height, steps=cfg["sample_steps"],
                guidance=cfg["sample_guide_scale"], frames=cfg["frame_num"], fps=16,
                num_outputs=cfg["num_images"], seed=int(job.get("seed", 0)),
                expected_seconds=cfg["expected_time"], time_scale=self.time_scale,
                sample_solver=cfg.get("sample_solver"), sample_shift=cfg.get("sample_shift"))
            result = self.generator.generate(spec, progress)
            paths = []
            for f in result.files:
                path = f"{job['user_id']}/{f.name}"
                self.upload(job["bucket"], path, f.data, f.content_type)
                paths.append(path)
            body: dict[str, Any] = {"job_id": job_id, "status": "completed", "attempt": attempt,
                                    "assets": paths, "metadata": {"seeds": result.metadata["seeds"]}}
            if result.thumbnail:
                thumb = f"{job['user_id']}/{result.thumbnail.name}"
                self.upload(job["bucket"], thumb, result.thumbnail.data, result.thumbnail.content_type)
                body["thumbnail"] = thumb
            if enhanced:
                body["enhanced_prompt"] = enhanced
            self.callback(body)
        except Exception as e:  # noqa: BLE001 - report, never leave the job hanging
            self.callback({"job_id": job_id, "status": "failed", "attempt": attempt,
                           "error_message": f"worker error: {type(e).__name__}"})


def main() -> int:
    parser = argparse.ArgumentParser(description="Reference external worker")
    parser.add_argument("--url", required=True, help="the service's base URL")
    parser.add_argument("--token", required=True, help="WORKER_TOKEN")
    parser.add_argument("--queue", default="wan_queue", choices=["sdxl_queue", "wan_queue"])
    parser.add_argument("--base-path", default="", help="QUEUE_BASE_PATH of the deployment")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between empty polls")
    parser.add_argument("--time-scale", type=float, default=0.0)
    parser.add_argument("--once", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args()
    worker = Worker(args.url, args.token, args.base_path, args.time_scale)
    while True:
        job = worker.pop(args.queue)
        if job is None:
            if args.once:
                return 0
            time.sleep(args.poll)
            continue
        print(f"job {job['id']} ({job['type']}) attempt {job.get('attempt')}", flush=True)
        worker.run_one(job)


if __name__ == "__main__":
    raise SystemExit(main())
