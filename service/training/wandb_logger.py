"""Weights & Biases adapter. wandb is imported when a run starts, and it never stops training.

Modes: `auto` is online when WANDB_API_KEY is set, offline otherwise; `disabled` never imports wandb.
An online start that fails retries offline (WARNING event); an offline one that fails turns logging
off (WARNING event). `init_timeout` bounds how long a start may block. Every call after the start is
wrapped: a failure is reported once and logging goes on without W&B.

The run id is chosen here and kept in the job's checkpoints, so a resumed job continues the same run
(`resume="allow"`). Files go under `<job_dir>/wandb/`. Offline, wandb cannot append to a folder: each
start (a resume after a crash or a restart) writes a new `offline-run-<time>-<id>` folder with the same
run id and the steps continuing; an INFO event then gives the one command that uploads them as one run,
`wandb sync --id <id> <folder> <folder> ...` (wandb syncs them in order of start time).
"""

from __future__ import annotations

import logging
import os
import shlex
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from service.errors import InvalidArgument
from service.records import EventKind
from service.spec import WandbSpec
from service.training.reporting import Reporter

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 30.0
RunMode = Literal["online", "offline", "disabled"]


def resolve_mode(mode: str) -> RunMode:
    """online, offline or disabled."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise InvalidArgument(
            f"logging.wandb.mode {mode!r} is unknown; allowed: auto, online, offline, disabled"
        )
    return cast(RunMode, mode)


class WandbLogger:
    """One job's W&B run; with no run (disabled, or failed to start) every method does nothing."""

    def __init__(self, run: Any, reporter: Reporter) -> None:
        self._run = run
        self._reporter = reporter

    @classmethod
    def start(
        cls,
        spec: WandbSpec,
        *,
        job_dir: Path,
        config: Mapping[str, Any],
        run_id: str | None,
        reporter: Reporter,
        name: str | None = None,
        init_timeout: float = INIT_TIMEOUT_S,
    ) -> WandbLogger:
        """Start (or resume, when `run_id` is given) the job's run in the mode `spec` asks for."""
        mode = resolve_mode(spec.mode)
        if mode == "disabled":
            return cls(None, reporter)
        resumed = run_id is not None  # kept in the checkpoint by an earlier start of this job
        run_id = run_id or uuid.uuid4().hex[:12]
        job_dir.mkdir(parents=True, exist_ok=True)
        attempts: tuple[RunMode, ...] = ("online", "offline") if mode == "online" else ("offline",)
        for attempt in attempts:
            try:
                run = _init(spec, attempt, job_dir, dict(config), run_id, name, init_timeout)
                if attempt == "offline":
                    _report_offline_parts(job_dir, run_id, reporter, resumed)
                return cls(run, reporter)
            except Exception as exc:  # wandb raises its own errors, timeouts, network errors...
                fallback = "retrying offline" if attempt == "online" else "W&B logging is off for this job"
                log.warning("wandb.init (%s) failed: %s", attempt, exc, exc_info=True)
                reporter.event(
                    EventKind.WARNING,
                    f"W&B {attempt} start failed ({type(exc).__name__}: {exc}); {fallback}",
                    {"wandb_mode": attempt, "error": str(exc)},
                )
        return cls(None, reporter)

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def run_dir(self) -> Path | None:
        """The run's folder (`<job_dir>/wandb/<offline-->run-<time>-<id>`)."""
        return Path(self._run.dir).parent if self._run is not None else None

    def log(self, metrics: Mapping[str, float], step: int, *, commit: bool = False) -> None:
        """Metrics at `step`. wandb holds a step's row open until a later step arrives (so an epoch's
        metrics join its last training step's row); `commit=True` closes it now, so a crash later
        cannot lose it."""
        self._call("log", dict(metrics), step=step, commit=commit)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._guard(lambda: self._run.summary.update(dict(values)))

    def finish(self) -> None:
        self._call("finish")
        self._run = None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._run is not None:
            self._guard(lambda: getattr(self._run, method)(*args, **kwargs))

    def _guard(self, action: Any) -> None:
        try:
            action()
        except Exception as exc:  # never let logging end training; report once, then go on without W&B
            log.warning("W&B call failed: %s", exc, exc_info=True)
            self._reporter.event(
                EventKind.WARNING,
                f"W&B logging failed ({type(exc).__name__}: {exc}); continuing without W&B",
                {"error": str(exc)},
            )
            self._run = None


def offline_parts(job_dir: Path, run_id: str) -> list[Path]:
    """The offline folders of run `run_id` in the job, oldest first (their names start with the time)."""
    return sorted((job_dir / "wandb").glob(f"offline-run-*-{run_id}"), key=lambda p: p.name)


def sync_command(parts: list[Path], run_id: str) -> str:
    """`wandb sync` of every part as one run: `--id` makes wandb upload them to that run in start order."""
    return " ".join(["wandb", "sync", "--id", run_id, *(shlex.quote(str(p)) for p in parts)])


def _report_offline_parts(job_dir: Path, run_id: str, reporter: Reporter, resumed: bool) -> None:
    """An INFO event with the sync command when this start continues an earlier one's run offline (the
    earlier part is an offline folder here, or a run that went online before)."""
    parts = offline_parts(job_dir, run_id)
    if not resumed and len(parts) < 2:
        return
    command = sync_command(parts, run_id)
    reporter.event(
        EventKind.INFO,
        f"W&B run {run_id} continues offline in a new folder ({len(parts)} offline folder(s), one per "
        f"start); upload them as one run with: {command}",
        {"wandb_run_id": run_id, "wandb_dirs": [str(p) for p in parts], "wandb_sync_command": command},
    )


def _init(
    spec: WandbSpec,
    mode: RunMode,
    job_dir: Path,
    config: dict[str, Any],
    run_id: str,
    name: str | None,
    init_timeout: float,
) -> Any:
    import wandb

    settings = wandb.Settings(
        init_timeout=init_timeout,
        silent=True,
        console="off",  # the job's own events carry progress; no stdout capture
        disable_git=True,
        save_code=False,
        disable_job_creation=True,
        x_disable_stats=True,
        x_disable_machine_info=True,
    )
    return wandb.init(
        project=spec.project,
        entity=spec.entity,
        tags=list(spec.tags),
        name=name,
        config=config,
        dir=str(job_dir),
        id=run_id,
        resume="allow",
        mode=mode,
        settings=settings,
        reinit="finish_previous",
    )
