"""A Hypothesis state machine over the job lifecycle, on the real databases.

Random interleavings of submit, deliver, duplicate delivery, crash (lease
expiry), worker results (fenced and stale), unfenced callbacks, cancel, retry
and reconcile must keep the invariants: only legal transitions, terminal states
never change (but a user's retry of a failed job), at most one completed
result per job, attempts within their cap, refunds never above charges, the
balance equal to the ledger, and asset rows that mirror their job.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings as hsettings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import select

from orchestrator import completion, reconciler, submission
from orchestrator.config import Settings
from orchestrator.db import Database
from orchestrator.errors import OrchestratorError
from orchestrator.models import CreditEntry, Image, Job, JobEvent, Profile, Video, utcnow
from orchestrator.status import ASSET_STATUS_FOR, TERMINAL, TRANSITIONS, JobStatus
from tests.conftest import wipe

LEASE = 30
TYPES = ("image_fast", "sdxl_image_fast", "video_fast")


def _machine(db: Database, settings: Settings) -> type[RuleBasedStateMachine]:
    class Lifecycle(RuleBasedStateMachine):
        jobs = Bundle("jobs")

        @initialize()
        def start(self) -> None:
            wipe(db)
            self.user = str(uuid.uuid4())
            self.clock = utcnow()
            self.last: dict[str, tuple[str, int]] = {}
            self.published: list[str] = []

        def _publish(self, job_id: str, job_type: str) -> None:
            self.published.append(job_id)

        # --- actions -------------------------------------------------------------------
        @rule(target=jobs, job_type=st.sampled_from(TYPES))
        def submit(self, job_type: str) -> str:
            try:
                job = submission.submit_job(db, self.user, submission.SubmitRequest(
                    job_type=job_type, metadata={"prompt": "a lantern"}), max_attempts=3).job
            except OrchestratorError:
                return str(uuid.uuid4())  # out of credits: a job that does not exist
            return job.id

        @rule(job_id=jobs)
        def deliver(self, job_id: str) -> None:
            completion.start_job(db, job_id, worker="w", lease_seconds=LEASE)

        @rule(job_id=jobs, ok=st.booleans(), stale=st.booleans())
        def worker_reports(self, job_id: str, ok: bool, stale: bool) -> None:
            with db.session() as s:
                job = s.get(Job, job_id)
            if job is None:
                return
            attempt = job.attempts - 1 if stale else job.attempts
            outcome = completion.Outcome(
                JobStatus.COMPLETED if ok else JobStatus.FAILED, attempt=attempt,
                assets=[f"{self.user}/{job_id}_{attempt}.png"] if ok else [],
                error=None if ok else "boom")
            completion.finish_job(db, job_id, outcome)

        @rule(job_id=jobs, status=st.sampled_from(["processing", "completed", "failed"]))
        def callback(self, job_id: str, status: str) -> None:
            with db.session() as s:
                if s.get(Job, job_id) is None:
                    return
            if status == "processing":
                completion.report_processing(db, job_id, worker="ext", lease_seconds=LEASE)
            else:
                completion.finish_job(db, job_id, completion.Outcome(
                    JobStatus(status), assets=[f"{self.user}/cb.png"] if status == "completed" else []))

        @rule(job_id=jobs)
        def cancel(self, job_id: str) -> None:
            try:
                completion.cancel_job(db, self.user, job_id)
            except OrchestratorError:
                pass

        @rule(job_id=jobs)
        def retry(self, job_id: str) -> None:
            try:
                submission.retry_job(db, self.user, job_id, max_attempts=3)
            except OrchestratorError:
                pass

        @rule(seconds=st.sampled_from([1, LEASE + 1, 3 * 3600]))
        def time_passes_and_reconcile(self, seconds: int) -> None:
            self.clock += dt.timedelta(seconds=seconds)
            reconciler.reconcile(db, settings, self._publish, now=self.clock)

        # --- invariants ----------------------------------------------------------------
        @invariant()
        def transitions_are_legal(self) -> None:
            with db.session() as s:
                rows = s.execute(select(Job.id, Job.status, Job.attempts, Job.max_attempts)).all()
            for job_id, status, attempts, max_attempts in rows:
                assert attempts <= max_attempts
                before = self.last.get(job_id)
                if before is not None and before[0] != status:
                    old = JobStatus(before[0])
                    assert JobStatus(status) in TRANSITIONS[old], (before, status)
                    assert not (old in TERMINAL and old is not JobStatus.FAILED), (before, status)
                if before is not None:
                    assert attempts >= before[1]
                self.last[job_id] = (status, attempts)

        @invariant()
        def one_completion_and_refunds_within_charges(self) -> None:
            with db.session() as s:
                completed = Counter(s.execute(select(JobEvent.job_id).where(
                    JobEvent.type == "job.completed")).scalars())
                ledger = s.execute(select(CreditEntry.job_id, CreditEntry.reason, CreditEntry.delta)
                                   .where(CreditEntry.user_id == self.user)).all()
                balance = s.execute(select(Profile.token_balance).where(
                    Profile.id == self.user)).scalar_one_or_none()
            assert all(n == 1 for n in completed.values())
            charges = Counter(j for j, reason, _ in ledger if reason == "job_charge")
            refunds = Counter(j for j, reason, _ in ledger if reason == "job_refund")
            assert all(refunds[j] <= charges[j] for j in refunds)
            if balance is not None:
                assert balance == 100 + sum(delta for _, _, delta in ledger)
                assert balance >= 0

        @invariant()
        def assets_mirror_their_jobs(self) -> None:
            with db.session() as s:
                for job in s.execute(select(Job)).scalars():
                    asset: Any = s.get(Video, job.video_id) if job.video_id else s.get(Image, job.image_id)
                    assert asset.status == ASSET_STATUS_FOR[JobStatus(job.status)].value
                    if job.status == "completed":
                        first = job.result["assets"][0]
                        assert (asset.video_url if job.video_id else asset.image_url) == first

    return Lifecycle


@pytest.mark.timeout(600)
def test_lifecycle_state_machine(db: Database, settings: Settings) -> None:
    machine = _machine(db, settings)
    machine.TestCase.settings = hsettings(
        max_examples=25 if db.dialect == "postgresql" else 40, stateful_step_count=30,
        deadline=None, suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()
