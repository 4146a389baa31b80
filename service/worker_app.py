"""The worker process, assembled: settings from the environment, a gRPC reporter, one job's work.

    python -m service.worker_app --job-id job-1a2b3c4d5e6f
    python -m service.worker_app --spare     (a spare: its job comes on stdin, service.jobs.spare_worker)

Under torchrun (a DDP job) every rank runs it; it reads RANK, LOCAL_RANK and WORLD_SIZE
(service.training.distributed) and dies with torchrun. A launcher (service.jobs.launcher) starts it
with every setting as TUNESERVE_* and, for this launch only,
the reporting API's address and a job-scoped token. It reads its job and reports through that API alone:
no path to the job store is given to it and it opens none. Exit codes: service.jobs.launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import sys
import time

from service.api.report_client import GrpcReporter, ReadyChannel
from service.jobs.launcher import REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV
from service.jobs.spare_worker import READY_BYTE, Assignment
from service.settings import Settings

log = logging.getLogger("service.worker_app")

EXIT_USAGE = 2
EXIT_SPARE_UNFIT = 3  # a spare that touched CUDA before its assignment: it takes no job
PR_SET_PDEATHSIG = 1
NICE_ENV = "TUNESERVE_WORKER_NICE"  # settings.worker_nice, as worker_env spells it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--job-id")
    which.add_argument("--spare", action="store_true", help="import everything, then wait for a job on stdin")
    parser.add_argument(
        "--spare-delay", type=float, default=0.0, help="a spare: seconds to wait before importing"
    )
    parser.add_argument(
        "--ready-fd", type=int, default=-1, help="a spare: a pipe to write one byte on once it is ready"
    )
    args = parser.parse_args(argv)
    lower_priority()  # first: a spare's imports are CPU taken from the service's API too
    logging.basicConfig(
        level=os.environ.get("TUNESERVE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s [worker %(process)d] %(message)s",
    )
    timings = {"process_started_at": _process_started_at()}
    ready: ReadyChannel | None = None  # a spare's channel to the reporting API, connected before its job
    if args.spare:
        waited = wait_for_assignment(timings, args.spare_delay, args.ready_fd)
        if waited is None:
            return 0 if "cuda_untouched" in timings else EXIT_SPARE_UNFIT
        assignment, ready = waited
        args.job_id = assignment.job_id
        timings["sent_at"] = assignment.sent_at
    # torch comes with these: imported here, not at the top, so that a spare waiting out its delay has not
    # imported it yet (the CPU is the job just started's, see wait_for_assignment)
    from service.jobs.worker import run_job
    from service.training.distributed import Ranks

    # its own process group, so a stop reaches its data-loader children too (already so when the
    # launcher started it with start_new_session: setsid then fails, harmlessly)
    with contextlib.suppress(OSError):
        os.setsid()
    ranks = Ranks.from_env()
    if ranks.distributed:
        _die_with_parent()
    # taken out of the environment: the children (data loaders, torch-model-archiver) need neither
    address, token = os.environ.pop(REPORT_ADDRESS_ENV, ""), os.environ.pop(REPORT_TOKEN_ENV, "")
    if not address or not token:
        log.error("%s and %s must be set (a launcher sets them)", REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV)
        return EXIT_USAGE
    settings = Settings()  # type: ignore[call-arg]  # every field has a default; values come from env
    channel = None if ready is None else ready.take_for(address, settings.report_tls_ca)
    timings["preconnected"] = float(channel is not None)
    reporter = GrpcReporter(
        address,
        token,
        args.job_id,
        heartbeat_s=settings.report_heartbeat_s,
        lost_after_s=settings.report_lost_s,
        tls_ca=settings.report_tls_ca,
        channel=channel,
    ).start()
    signal.signal(signal.SIGTERM, reporter.signal_stop)
    signal.signal(signal.SIGINT, reporter.signal_stop)
    try:
        if not args.spare:
            timings["assigned_at"] = timings["process_started_at"]  # its job came with its command line
            # what it imports on its way anyway, here (a stop meanwhile is handled), timed as a spare's
            preload()
            timings["imports_done_at"] = time.time()
        # read by bench/latency.py: where the time before the first training step went
        log.info("worker timings %s", json.dumps({"warm": bool(args.spare), **timings}))
        return run_job(settings, reporter, ranks)
    finally:
        reporter.close()


def lower_priority() -> None:
    """Run settings.worker_nice nicer than the service that started this worker: where they share CPUs,
    an API call is answered first and training takes the CPU left (unchanged on an idle machine). Read
    from the environment before Settings: a spare imports torch long before its job's settings come."""
    raw = os.environ.get(NICE_ENV, "")
    try:
        increment = int(raw) if raw else int(Settings.model_fields["worker_nice"].default)
    except ValueError:
        log.warning("%s=%r is not a whole number; the worker keeps the service's priority", NICE_ENV, raw)
        return
    if increment > 0:
        os.nice(increment)


def wait_for_assignment(
    timings: dict[str, float], delay_s: float = 0.0, ready_fd: int = -1
) -> tuple[Assignment, ReadyChannel | None] | None:
    """A spare's life before its job: preload, check CUDA is untouched, connect to the reporting API when
    its address is known, say so on `ready_fd`, read the assignment from stdin, then become that job's
    worker (its environment, its worker.log). None: no job will come (the launcher closed the pipe, the
    service is gone), or this spare touched CUDA and must not take one."""
    _set_parent_death_signal(signal.SIGKILL)  # idle, it dies with the service
    if delay_s > 0:  # leave the CPUs to the job just started, unless a job waits already (any line: a
        # nudge or the assignment itself, see service.jobs.spare_worker)
        select.select([sys.stdin], [], [], delay_s)
    preload()
    timings["imports_done_at"] = time.time()
    import torch

    if torch.cuda.is_initialized():
        # CUDA_VISIBLE_DEVICES is read when CUDA initialises: this process could not honour a job's GPUs
        log.error("spare worker: CUDA was initialised before an assignment; exiting (the job starts cold)")
        return None
    timings["cuda_untouched"] = 1.0
    ready = connect_ahead()
    log.info("spare worker ready in %.1f s", timings["imports_done_at"] - timings["process_started_at"])
    _say_ready(ready_fd)
    line = sys.stdin.buffer.readline()
    while line and not line.strip():  # nudges: the job they announced comes next (or a cancel ate it)
        line = sys.stdin.buffer.readline()
    if not line:
        log.info("spare worker: no assignment came; exiting")
        return None
    assignment = Assignment.decode(line)
    timings["assigned_at"] = time.time()
    _set_parent_death_signal(0)  # a worker outlives its service like a cold one (stop_leftover finds it)
    _become_worker(assignment)
    return assignment, ready


def _say_ready(fd: int) -> None:
    """One byte on the launcher's pipe: a job handed over now starts at once. Closed after, so that the
    job's children (data loaders) do not hold it."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):  # the launcher is gone or stopped listening: it changes nothing here
        os.write(fd, READY_BYTE)
    with contextlib.suppress(OSError):
        os.close(fd)


def connect_ahead() -> ReadyChannel | None:
    """The spare's channel to the reporting API, connected now, off its job's critical path: the address
    (REPORT_ADDRESS_ENV, no secret; the token comes with the job) and the CA are the job's settings. None
    when the launcher gave no address or the settings cannot be read (the job then opens its own)."""
    address = os.environ.get(REPORT_ADDRESS_ENV, "")
    if not address:
        return None
    try:
        tls_ca = Settings().report_tls_ca  # type: ignore[call-arg]  # values come from env
        ready = ReadyChannel(address, tls_ca)
    except ValueError as exc:  # a bad setting or an unreadable CA: the job meets it again and reports it
        log.warning("spare worker: no early connection to the reporting API: %s", exc)
        return None
    log.info(
        "spare worker: connected to the reporting API at %s ahead of its job: %s", address, ready.connected
    )
    return ready


def preload() -> None:
    """Import what a job imports before its first step (and packaging, after its last), but call nothing:
    above all nothing in torch.cuda (see service.jobs.spare_worker)."""
    import torchvision.models  # noqa: F401

    import service.packaging.choose_backend
    import service.training.runner  # noqa: F401
    from service.heap import freeze_imports

    freeze_imports()  # the training loop's full collections skip torch's objects: see service.heap


def _become_worker(assignment: Assignment) -> None:
    """The job's environment in place of the spare's (before anything reads a setting or CUDA), and its
    worker.log as stdout and stderr, as a cold worker's."""
    os.environ.clear()  # through unsetenv/putenv: the C environment CUDA reads follows
    os.environ.update(assignment.env)
    fd = os.open(assignment.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the assignment pipe is done; children get what a cold worker's get
    os.close(null)


def _process_started_at() -> float:
    """When this process started (wall clock), from /proc: before the interpreter imported anything."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            age = float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError):
        return time.time()


def _die_with_parent() -> None:
    """A rank ends when torchrun does, even by SIGKILL (its own session is out of the group's reach)."""
    _set_parent_death_signal(signal.SIGKILL)


def _set_parent_death_signal(sig: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))


def exit_now(code: int) -> None:
    """Exit without tearing the interpreter down: with torch, torchvision and the training stack loaded,
    Python's finalisation takes ~2 s on a 2-core CPU (1.85 s measured, 0.06 s this way), and the
    service deploys a packaged job only once its worker has exited (service.jobs.exit_outcomes). What
    an exit must do still runs: the atexit handlers (multiprocessing joins its children, logging
    flushes), then stdio is flushed."""
    import atexit

    atexit._run_exitfuncs()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())  # an exception still ends the process the usual way, with its traceback
