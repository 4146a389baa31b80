"""TLS on the internal reporting API, on a real loopback server with a throw-away PKI made by the
`openssl` CLI (the `cryptography` package is not installed): the worker's client that trusts the CA
reports; a plaintext client and a client trusting another CA fail the handshake; the job token is still
checked over TLS; half a configuration, and plaintext for Kubernetes pods, are refused at start."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from tls_pki import make_pki

from service.api.report_client import GrpcReporter, ReadyChannel
from service.api.reporting_server import ReportingServer, start_reporting_server
from service.errors import Unauthenticated, Unavailable
from service.jobs.intake import Intake
from service.jobs.launcher import worker_env
from service.jobs.store import JobStore
from service.records import EventKind, JobState
from service.settings import Settings
from service.spec import JobSpec


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(tmp_path: Path, pki: dict[str, Path], **overrides: object) -> Settings:
    values: dict[str, object] = {
        "state_dir": tmp_path,
        "report_tls_cert": pki["cert"],
        "report_tls_key": pki["key"],
        "report_tls_ca": pki["ca"],
    }
    return Settings(**{**values, **overrides})  # type: ignore[arg-type]


class TlsPlane:
    """A real store, intake and reporting server serving TLS on loopback, with one RUNNING job."""

    def __init__(self, settings: Settings) -> None:
        self.store = JobStore(settings.jobs_db)
        self.intake = Intake(self.store)
        self.server: ReportingServer = start_reporting_server(settings, self.intake)
        spec = JobSpec.model_validate(
            {"name": "w", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
        )
        self.job_id = self.store.create_job(spec).id
        self.store.transition(self.job_id, JobState.RUNNING)
        self.token = self.intake.issue(self.job_id)

    def reporter(self, tls_ca: Path | None, token: str | None = None) -> GrpcReporter:
        # lost_after_s short: a refused handshake is UNAVAILABLE, retried until the link counts as lost
        return GrpcReporter(
            self.server.address, token or self.token, self.job_id, lost_after_s=0.5, tls_ca=tls_ca
        ).start()

    def close(self) -> None:
        self.server.stop(0)
        self.store.close()


@pytest.fixture
def plane(tmp_path: Path, pki: dict[str, Path]) -> Iterator[TlsPlane]:
    made = TlsPlane(tls_settings(tmp_path, pki))
    yield made
    made.close()


def test_a_worker_that_trusts_the_ca_reports_over_tls(plane: TlsPlane, pki: dict[str, Path]) -> None:
    reporter = plane.reporter(pki["ca"])
    try:
        assert reporter.assignment().id == plane.job_id
        reporter.event(EventKind.INFO, "over TLS", {"n": 1})
        assert reporter.flush(timeout=10)
        reporter.move(JobState.PACKAGING, "trained")
    finally:
        reporter.close()
    assert "over TLS" in [e.message for e in plane.store.events_after(plane.job_id)]
    assert plane.store.get_job(plane.job_id).state == JobState.PACKAGING


def test_a_spare_connects_ahead_over_tls_trusting_the_ca_alone(plane: TlsPlane, pki: dict[str, Path]) -> None:
    """A spare's early channel (ReadyChannel) honours settings.report_tls_ca: the handshake is done before
    the job, and the job's reporter reports over that channel; another CA never connects."""
    ready = ReadyChannel(plane.server.address, pki["ca"])
    assert ready.connected
    channel = ready.take_for(plane.server.address, pki["ca"])
    assert channel is ready.channel
    reporter = GrpcReporter(
        plane.server.address, plane.token, plane.job_id, tls_ca=pki["ca"], channel=channel
    ).start()
    try:
        assert reporter.assignment().id == plane.job_id
    finally:
        reporter.close()

    untrusted = ReadyChannel(plane.server.address, pki["other_ca"], connect_timeout_s=1.0)
    assert not untrusted.connected
    untrusted.channel.close()


def test_a_plaintext_worker_fails_the_handshake(plane: TlsPlane) -> None:
    reporter = plane.reporter(None)
    with pytest.raises(Unavailable):
        reporter.assignment()
    reporter.close()


def test_a_worker_that_trusts_another_ca_fails_the_handshake(plane: TlsPlane, pki: dict[str, Path]) -> None:
    reporter = plane.reporter(pki["other_ca"])
    with pytest.raises(Unavailable):
        reporter.assignment()
    reporter.close()


def test_tls_does_not_replace_the_job_token(plane: TlsPlane, pki: dict[str, Path]) -> None:
    reporter = plane.reporter(pki["ca"], token="not-the-token")
    with pytest.raises(Unauthenticated):
        reporter.assignment()
    reporter.close()


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path, pki: dict[str, Path]) -> None:
    # the files the server reads, as a mounted Secret: replaced in place by the renewal
    live = tmp_path / "tls"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    shutil.copy(pki["cert"], cert)
    shutil.copy(pki["key"], key)
    made = TlsPlane(tls_settings(tmp_path / "state", pki, report_tls_cert=cert, report_tls_key=key))
    try:
        before = made.reporter(pki["ca"])
        assert before.assignment().id == made.job_id
        before.close()
        # renewed, here under another CA, so that which certificate is served shows
        for source, target in ((pki["other_cert"], cert), (pki["other_key"], key)):
            staged = target.with_suffix(".new")
            shutil.copy(source, staged)
            staged.replace(target)  # a new file (new inode), as the kubelet's symlink flip gives
        after = made.reporter(pki["other_ca"])
        assert after.assignment().id == made.job_id
        after.close()
        stale = made.reporter(pki["ca"])
        with pytest.raises(Unavailable):
            stale.assignment()
        stale.close()
    finally:
        made.close()


def test_the_workers_get_the_ca_path_never_key_material(tmp_path: Path, pki: dict[str, Path]) -> None:
    env = worker_env(tls_settings(tmp_path, pki))
    assert env["TUNESERVE_REPORT_TLS_CA"] == str(pki["ca"].resolve())
    assert not any("PRIVATE KEY" in value or "CERTIFICATE" in value for value in env.values())


@pytest.mark.parametrize("left_out", ["report_tls_cert", "report_tls_key", "report_tls_ca"])
def test_half_a_tls_configuration_is_refused(tmp_path: Path, pki: dict[str, Path], left_out: str) -> None:
    with pytest.raises(ValidationError, match=f"TUNESERVE_{left_out.upper()}"):
        tls_settings(tmp_path, pki, **{left_out: None})


def test_an_unreadable_server_key_stops_the_start_naming_it(tmp_path: Path, pki: dict[str, Path]) -> None:
    settings = tls_settings(tmp_path, pki, report_tls_key=tmp_path / "missing.key")
    store = JobStore(settings.jobs_db)
    try:
        with pytest.raises(ValueError, match=r"TUNESERVE_REPORT_TLS_KEY .*missing\.key"):
            start_reporting_server(settings, Intake(store))
    finally:
        store.close()


K8S = {
    "launcher": "kubernetes",
    "report_host": "0.0.0.0",
    "report_port": 50052,
    "report_advertise_address": "tuneserve-reporting:50052",
}


def test_kubernetes_without_tls_is_refused_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"TUNESERVE_REPORT_TLS_CERT.*ALLOW_PLAINTEXT"):
        Settings(state_dir=tmp_path, **K8S)  # type: ignore[arg-type]


def test_kubernetes_with_tls_or_an_explicit_waiver_starts(tmp_path: Path, pki: dict[str, Path]) -> None:
    assert tls_settings(tmp_path, pki, **K8S).report_tls
    waived = Settings(state_dir=tmp_path, report_allow_plaintext=True, **K8S)  # type: ignore[arg-type]
    assert not waived.report_tls


def test_plaintext_off_loopback_is_logged_as_such(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(state_dir=tmp_path, report_host="0.0.0.0")
    store = JobStore(settings.jobs_db)
    try:
        with caplog.at_level(logging.WARNING, logger="service.api.reporting_server"):
            server = start_reporting_server(settings, Intake(store))
            server.stop(0)
    finally:
        store.close()
    assert any("travels in clear" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_the_real_worker_program_reports_over_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    """`python -m service.worker_app` itself (not a test double) dials the TLS reporting API with the CA
    its environment names: its job's dataset is missing, and the FAILED it reports arrives in the store."""
    import subprocess
    import sys

    from service.jobs.launcher import REPORT_ADDRESS_ENV, REPORT_TOKEN_ENV

    settings = tls_settings(tmp_path / "state", pki, data_root=tmp_path / "data")
    (tmp_path / "data").mkdir()
    plane = TlsPlane(settings)
    try:
        env = worker_env(settings) | {REPORT_ADDRESS_ENV: plane.server.address, REPORT_TOKEN_ENV: plane.token}
        done = subprocess.run(
            [sys.executable, "-m", "service.worker_app", "--job-id", plane.job_id],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        job = plane.store.get_job(plane.job_id)
        assert job.state == JobState.FAILED, (done.returncode, done.stderr[-2000:])
        assert "dataset" in (job.error or "").lower(), job.error
    finally:
        plane.close()
