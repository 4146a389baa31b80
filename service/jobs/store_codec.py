"""The job store's codec: jobs and events as database rows and JSON, results from JSON, page tokens."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Mapping
from typing import Any

from service.errors import InvalidArgument
from service.records import EventKind, Job, JobEvent, JobResult, JobState
from service.spec import JobSpec

RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(JobResult))
# Bounded in memory, not only in count. Measured with tracemalloc under tests/integration/test_load.py's
# 64 clients: a decoded spec ~2.4 KB, a row kept as its key ~1.1 KB, its message (job_messages) ~0.6 KB.
# At 4096 entries each the caches held ~20 MiB of Python objects and the service's RSS grew 42-55 MiB
# while they filled; 1024 covers twenty ListJobs pages of 50 and holds ~5 MiB.
SPEC_CACHE = 1024  # specs kept decoded
JOB_CACHE = 1024  # job versions kept decoded, newest in; the oldest go first


class JobVersions:
    """One Job object per version of a job's row: the same column values give the same object back.

    Decoding a row (result JSON, the Job itself) was most of a ListJobs page in-process (0.5 of 0.7 ms for
    50). A write changes at least one column, so a changed job is a new key and never an old answer; and
    the object's identity stands for its version, which service.api.job_messages caches messages by.
    """

    def __init__(self, size: int = JOB_CACHE) -> None:
        self._size = size
        self._jobs: dict[tuple[Any, ...], Job] = {}
        self._lock = threading.Lock()  # lookups run without it: a dict read is atomic in CPython

    def job(self, row: Mapping[str, Any]) -> Job:
        key = tuple(row) if isinstance(row, sqlite3.Row) else tuple(row.values())
        job = self._jobs.get(key)
        if job is None:
            job = decode_job(row)
            with self._lock:
                self._jobs[key] = job
                while len(self._jobs) > self._size:
                    del self._jobs[next(iter(self._jobs))]  # insertion order: the oldest version
        return job


_VERSIONS = JobVersions()


def job_from_row(row: Mapping[str, Any]) -> Job:
    """The job a row holds, decoded once per version of the row (JobVersions)."""
    return _VERSIONS.job(row)


def decode_job(row: Mapping[str, Any]) -> Job:
    return Job(
        id=row["id"],
        spec=spec_from_json(row["spec"]),
        state=JobState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        attempts=row["attempts"],
        idempotency_key=row["idempotency_key"],
        cancel_requested=bool(row["cancel_requested"]),
        result=result_from_json(json.loads(row["result"])),
        owner=row["owner"],
    )


@functools.lru_cache(maxsize=SPEC_CACHE)
def spec_from_json(text: str) -> JobSpec:
    """A job's spec from its column, decoded once: validating one takes ~0.35 ms (a ListJobs page of 50,
    17 ms), while a stored spec never changes and a JobSpec is frozen, so one object serves every read."""
    return JobSpec.model_validate(json.loads(text))


def event_from_row(row: Mapping[str, Any]) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"],
        seq=row["seq"],
        time=row["time"],
        kind=EventKind(row["kind"]),
        message=row["message"],
        data=json.loads(row["data"]),
    )


def result_from_json(data: dict[str, Any]) -> JobResult:
    known = {k: v for k, v in data.items() if k in RESULT_FIELDS}
    for name in ("class_names", "gate_sample"):
        if name in known:
            known[name] = tuple(known[name])
    return JobResult(**known)


def jsonable(value: Any) -> Any:
    """Plain JSON types: paths and enums become strings, tuples lists, numpy/torch scalars numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def encode_page_token(num: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{num}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> int:
    try:
        version, num = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().split(":")
        if version != "v1" or not 1 <= int(num) < 2**62:  # SQLite integers are 64-bit
            raise ValueError(token)
        return int(num)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            f"page_token {token!r} is not a token this service issued; pass the next_page_token of the "
            "previous ListJobs response unchanged, or '' for the first page"
        ) from None
