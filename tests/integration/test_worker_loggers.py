"""A job's loggers as a real worker process leaves them: TensorBoard's event files and W&B's offline run
are read back after the worker has exited, as a user would open or sync them.

W&B's run file is written by its wandb-core process, which buffers it: the records reach the file at
wandb.finish() or when the worker's atexit handlers tear W&B down, and the worker ends with
service.worker_app.exit_now (no interpreter teardown, the atexit handlers still run). Seen while this
test was written: with neither (no finish(), atexit skipped), the file held no record at all, and this
test failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    channel_to,
    make_image_folder,
    make_settings,
    running_service,
    spec,
    stub,
    wait_for,
    wait_state,
)

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.app import Service
from tests.wandb_files import read_wandb_records

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    # as a deployment starts it: no W&B login, and no wandb-core of this test process for the worker to
    # borrow (wandb hands WANDB_SERVICE to child processes once it has run here)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    settings = make_settings(tmp_path)
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as running:
        yield running


def test_a_finished_workers_tensorboard_and_wandb_files_hold_the_whole_run(service: Service) -> None:
    logging = {"tensorboard": True, "wandb": {"mode": "offline", "project": "worker-exit"}}
    with channel_to(service) as channel:
        client = stub(channel)
        job = client.CreateJob(
            pb.CreateJobRequest(spec=spec("loggers", training={"epochs": 2}, logging=logging))
        )
        final = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=240)
    assert final.state == pb.SUCCEEDED, final.error
    wait_for(lambda: not service.scheduler.running(), 60, "the worker to exit")
    job_dir = service.settings.job_dir(job.id)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/val_loss")] == [1, 2]

    run_dir = Path(final.result.wandb_dir)
    assert run_dir.parent == job_dir / "wandb" and run_dir.name.endswith(final.result.wandb_run_id)
    run = read_wandb_records(run_dir, keep_records=True)
    kinds = {record.WhichOneof("record_type") for record in run["records"]}
    assert {"run", "history", "summary", "exit"} <= kinds  # the exit: written after finish() returned
    assert [row["epoch"] for row in run["history"] if "epoch/val_loss" in row] == [1, 2]
    assert run["summary"]["best_val_loss"] == pytest.approx(final.result.best_metric)
