"""Stopping the workers while the job store cannot be reached (the database is away at SIGTERM).

Nothing can be recorded then: no stop reason for a heartbeat reply, no exit outcome, no re-queue. So each
job stays as the store has it (RUNNING, leased to this replica), and whoever looks next settles it:
another replica once the lease runs out, or this replica started again under its name (its
predecessor's jobs). What needs no store is still done:
- a worker that runs on without this replica (a TrainJob), when draining, is left training: the replica
  that settles its job adopts it, so none of its work is lost;
- any other worker is asked to stop by its launcher (a local process gets SIGTERM and checkpoints) when
  draining, killed when not or once the deadline has passed, and then released: it must not outlive
  this service unwatched. Its job resumes from that checkpoint once it is re-queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from service.jobs.launcher import Launcher, WorkerHandle
from service.stop_reasons import DRAINING

log = logging.getLogger(__name__)

POLL_S = 0.05


def stop_without_store(
    launcher: Launcher, handles: Sequence[WorkerHandle], *, drain: bool, deadline: float
) -> None:
    """End (or, draining, leave training) the workers `handles` by `deadline` (time.monotonic())."""
    ending: list[WorkerHandle] = []
    for handle in handles:
        if drain and launcher.can_adopt(handle.ref):
            log.warning(
                "job %s: its worker %s is left training; the replica that takes the job over adopts it",
                handle.job_id,
                handle.ref,
            )
            continue
        if drain:
            launcher.stop(handle, DRAINING)
        else:
            launcher.kill(handle)
        ending.append(handle)
    while ending:
        for handle in list(ending):
            ended = launcher.poll(handle)
            if ended is None and time.monotonic() <= deadline:
                continue
            if ended is None:
                log.warning("job %s did not stop by the drain's deadline; killing it", handle.job_id)
                launcher.kill(handle)
            launcher.release(handle)  # and its stragglers; the job's checkpoint is on disk
            ending.remove(handle)
            log.info(
                "job %s: worker %s ended; the job resumes once it is re-queued", handle.job_id, handle.ref
            )
        time.sleep(POLL_S)
