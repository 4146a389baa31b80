"""Session fixtures of the export proof (test_export_serving.py, test_export_readiness.py): one small job
really trained on scikit-learn's digits, its validation images as the promotion gate picks them, its
export, and ONE plain TorchServe serving that export, started the way KServe's runtime starts it
(bench/plain_torchserve.py). The readiness probe is sampled while that server starts, so both files
check the same start instead of paying for two."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from export_proof import (
    DIGITS_PER_CLASS,
    EXPORTED_MODEL,
    EXPORTED_VERSION,
    READY_TIMEOUT_S,
    StartedServer,
    TrainedJob,
    probe_once,
    write_digits,
)

from bench.plain_torchserve import plain_server, plain_virtualenv, running

OCTET_STREAM = "application/octet-stream"
# each probe is a Python process: every 0.2 s they compete for a small machine's cores with the start they
# watch; the loading window they must catch is over 10 s long on a 2-core machine
PROBE_INTERVAL_S = 1.0


@pytest.fixture(scope="session")
def digits_job(tmp_path_factory: pytest.TempPathFactory) -> TrainedJob:
    """A tiny MobileNetV3 trained one short epoch on digits through the service's own training code; its
    gate images come from images_for_job, the function the promotion gate calls."""
    import torch

    from service.packaging.gate_images import images_for_job
    from service.records import Job, JobResult, JobState
    from service.settings import Settings
    from service.spec import JobSpec
    from service.training.reporting import CollectingReporter
    from service.training.runner import train

    root = tmp_path_factory.mktemp("digits-job")
    write_digits(root / "data" / "digits", DIGITS_PER_CLASS)
    spec = JobSpec.model_validate(
        {
            "name": "digits",
            "model": {"architecture": "mobilenet_v3_small", "weights": "none"},
            "data": {"path": "digits", "val_fraction": 0.25, "num_workers": 0},
            "training": {"epochs": 1, "batch_size": 16, "image_size": 64, "augmentation": "none", "seed": 0},
            "early_stopping": {"enabled": False},
            "logging": {"tensorboard": False, "wandb": {"mode": "disabled"}},
        }
    )
    settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
    reporter = CollectingReporter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spinning threads crawl on a shared, busy CPU
    try:
        outcome = train(spec, root / "job", settings, reporter)
    finally:
        torch.set_num_threads(threads)
    assert outcome.status == "completed" and outcome.best_checkpoint is not None
    job = Job(
        "job-digits", spec, JobState.SUCCEEDED, 1.0, 1.0,
        result=JobResult(gate_sample=tuple(reporter.fields["gate_sample"])),
    )  # fmt: skip
    gate = images_for_job(job, settings)
    return TrainedJob(
        outcome.best_checkpoint,
        [image.data for image in gate.images],
        [image.name for image in gate.images],
        gate.source,
        gate.warning,
    )


@pytest.fixture(scope="session")
def plain_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with the third-party packages and TorchServe's `torchserve` command, without tuneserve."""
    return plain_virtualenv(tmp_path_factory.mktemp("plain") / "venv")


@pytest.fixture(scope="session")
def exported(digits_job: TrainedJob, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job's checkpoint packaged and exported (token authorization on, the default)."""
    from service.packaging.archiver import build_archive
    from service.packaging.export import export_archive
    from service.serving_types import ExportRequest

    root = tmp_path_factory.mktemp("export")
    archive = build_archive(digits_job.checkpoint, root / "store", EXPORTED_MODEL, EXPORTED_VERSION)
    export_archive(archive, ExportRequest(job_id="job-digits", target=root / "out"))
    return root / "out"


@pytest.fixture(scope="session")
def plain_torchserve(
    plain_env: Path, exported: Path, digits_job: TrainedJob, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartedServer]:
    """One plain TorchServe on the export for the whole session, with its start-up watched by the probe."""
    server = plain_server(exported, tmp_path_factory.mktemp("run"), plain_env)
    before = probe_once(server, time.monotonic())
    started = time.monotonic()
    with running(server):
        samples = []
        while True:
            samples.append(probe_once(server, started))
            if samples[-1].probe_rc == 0 or time.monotonic() - started > READY_TIMEOUT_S:
                break
            time.sleep(PROBE_INTERVAL_S)
        status = 0
        if samples[-1].probe_rc == 0:  # ready must mean it answers now, not after a wait for a worker
            request = urllib.request.Request(
                f"{server.url}/predictions/{EXPORTED_MODEL}", data=digits_job.images[0],
                headers={"Authorization": f"Bearer {server.key()}", "Content-Type": OCTET_STREAM},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as answer:
                status = answer.status if answer.read() else 0
            server.wait_healthy()
        yield StartedServer(server, before, samples, status)
