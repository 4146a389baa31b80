"""Each Job's message, serialized once per Job object, for GetJob and ListJobs.

The store hands out one immutable Job per version of a job's row (service.jobs.store_codec.JobVersions), so
a job read again unchanged is the same object and its bytes are reused, while any write yields a new object,
which misses: a changed job is never answered from an earlier version. Building a Job message field by field
was most of a ListJobs page (1.2 of 1.9 ms for 50 jobs in-process).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.records import Job

CACHED_JOBS = 1024  # ~0.6 KB a message; the oldest go first (sized as service.jobs.store_codec's)


@dataclass(frozen=True)
class Serialized:
    job: bytes  # a pb.Job
    listed: bytes  # a pb.ListJobsResponse holding that job alone: pages are these concatenated


class JobMessages:
    """`of(job)`: the job's serialized messages, built with `build` the first time this object is seen."""

    def __init__(self, build: Callable[[Job], pb.Job], size: int = CACHED_JOBS) -> None:
        self._build = build
        self._size = size
        # keyed by id(): a Job is not hashable (its result holds a dict). An entry keeps its Job alive, so
        # while it is cached no other object can have its id.
        self._messages: dict[int, tuple[Job, Serialized]] = {}
        self._lock = threading.Lock()  # lookups run without it: a dict read is atomic in CPython

    def of(self, job: Job) -> Serialized:
        entry = self._messages.get(id(job))
        if entry is not None and entry[0] is job:
            return entry[1]
        message = self._build(job)
        data = Serialized(
            message.SerializeToString(), pb.ListJobsResponse(jobs=[message]).SerializeToString()
        )
        with self._lock:
            self._messages[id(job)] = (job, data)
            while len(self._messages) > self._size:
                del self._messages[next(iter(self._messages))]  # insertion order: the oldest
        return data
