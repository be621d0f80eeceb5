"""Job and asset statuses, and the one table of legal job transitions."""
from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

#: status → the statuses it may move to. ``failed → queued`` is the explicit
#: user retry; ``processing → queued`` is a lease expiring with attempts left.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED,
                                 JobStatus.CANCELLED}),
    JobStatus.PROCESSING: frozenset({JobStatus.QUEUED, JobStatus.COMPLETED, JobStatus.FAILED,
                                     JobStatus.CANCELLED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset(),
}


def sources_of(target: JobStatus) -> tuple[str, ...]:
    """The statuses from which ``target`` is reachable: the guard of a CAS update."""
    return tuple(s.value for s, targets in TRANSITIONS.items() if target in targets)


class AssetStatus(str, enum.Enum):
    """Status of an ``images``/``videos`` row (the legacy vocabulary).

    A cancelled job leaves its asset ``failed``: legacy clients know only
    these four words; the job row says why.
    """

    QUEUED = "queued"
    GENERATING = "generating"
    COMPLETED = "completed"
    FAILED = "failed"


#: The asset status that mirrors each job status.
ASSET_STATUS_FOR: dict[JobStatus, AssetStatus] = {
    JobStatus.QUEUED: AssetStatus.QUEUED,
    JobStatus.PROCESSING: AssetStatus.GENERATING,
    JobStatus.COMPLETED: AssetStatus.COMPLETED,
    JobStatus.FAILED: AssetStatus.FAILED,
    JobStatus.CANCELLED: AssetStatus.FAILED,
}
