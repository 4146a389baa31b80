"""Why a worker is asked to stop at its next safe point: the word a stop request, the job store's report
grants and a heartbeat reply carry, from the scheduler to the worker's training loop.

One home for both words: the control plane compares them (an adoption keeps a cancel and drops a drain
the worker has not heard), the worker acts on them (a cancel ends the job, a drain checkpoints it for
its resumption), and every rank of a distributed job agrees on one (service.training.distributed).
"""

from __future__ import annotations

CANCELLED = "cancelled"  # the job was cancelled: it ends CANCELLED
DRAINING = "draining"  # its replica is stopping: the job goes back to the queue and resumes
STOP_REASONS = (CANCELLED, DRAINING)
