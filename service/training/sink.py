"""One place a run's numbers go: TensorBoard and Weights & Biases, opened once, closed once.

The runner and telemetry log scalars through the sink, which writes them to both back-ends (either
may be off). Pictures, figures and curves are TensorBoard's alone: they go through `sink.tensorboard`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.spec import JobSpec
from service.training.reporting import Reporter
from service.training.tb_logger import HParam, TensorBoardLogger
from service.training.wandb_logger import WandbLogger


class MetricsSink:
    """A run's TensorBoard logger and W&B run, behind one set of calls."""

    def __init__(self, tensorboard: TensorBoardLogger, wandb: WandbLogger) -> None:
        self.tensorboard = tensorboard
        self.wandb = wandb

    @classmethod
    def open(
        cls, spec: JobSpec, job_dir: Path, reporter: Reporter, *, wandb_run_id: str | None = None
    ) -> MetricsSink:
        """Both back-ends as the spec asks; `wandb_run_id` (from last.pt) continues a resumed job's run."""
        tensorboard = TensorBoardLogger(job_dir / "tensorboard", enabled=spec.logging.tensorboard)
        wandb = WandbLogger.start(
            spec.logging.wandb, job_dir=job_dir, config=spec.to_dict(), run_id=wandb_run_id,
            reporter=reporter, name=spec.name,
        )  # fmt: skip
        return cls(tensorboard, wandb)

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run_id

    def result_fields(self) -> dict[str, Any]:
        """Where the logs are, for the job's result."""
        return {
            "tensorboard_dir": str(self.tensorboard.log_dir) if self.tensorboard.enabled else None,
            "wandb_dir": str(self.wandb.run_dir) if self.wandb.run_dir else None,
            "wandb_run_id": self.wandb.run_id,
        }

    def step(self, values: Mapping[str, float], step: int) -> None:
        """A training step's scalars, at the optimizer step."""
        self.tensorboard.scalars(values, step)
        self.wandb.log(values, step)

    def epoch(self, values: Mapping[str, float], epoch: int, step: int) -> None:
        """An epoch's scalars: TensorBoard by epoch; W&B at the last step, committed (the epoch is
        checkpointed: a crash later must not lose its row)."""
        self.tensorboard.scalars(values, epoch)
        self.wandb.log({**values, "epoch": epoch}, step, commit=True)

    def summary(
        self,
        hparams: Mapping[str, HParam],
        best_metrics: Mapping[str, float],
        wandb_summary: Mapping[str, Any],
    ) -> None:
        """The end of the run: hyperparameters with the best metrics (TensorBoard), the summary (W&B)."""
        self.tensorboard.hparams(hparams, best_metrics)
        self.wandb.summary(wandb_summary)

    def close(self) -> None:
        self.tensorboard.close()
        self.wandb.finish()
