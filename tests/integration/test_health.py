"""The health reporter on a real server: per-name readiness as the probe reports it, then gone."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import channel_to, make_settings, running_service

from service.api.health import HealthReporter

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def status_of(channel: grpc.Channel, name: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name)).status


def test_each_probed_name_is_published_and_a_vanished_one_becomes_unknown(tmp_path: Path) -> None:
    readiness = {"torchserve": True, "torchserve/pets": False}
    with running_service(make_settings(tmp_path)) as service, channel_to(service) as channel:
        reporter = HealthReporter(lambda: readiness, service.server.set_serving)
        reporter.report_once()
        first = {name: status_of(channel, name) for name in readiness}
        readiness.update({"torchserve/pets": True})
        reporter.report_once()
        ready = status_of(channel, "torchserve/pets")
        del readiness["torchserve/pets"]
        reporter.report_once()
        gone = status_of(channel, "torchserve/pets")
    assert first == {"torchserve": SERVING, "torchserve/pets": NOT_SERVING}
    assert ready == SERVING and gone == UNKNOWN


def test_a_failing_probe_reports_what_it_knew_not_serving(tmp_path: Path) -> None:
    calls = []

    def probe() -> dict[str, bool]:
        calls.append(time.monotonic())
        if len(calls) > 1:
            raise ConnectionError("TorchServe's management API went away")
        return {"torchserve": True, "torchserve/pets": True}

    with running_service(make_settings(tmp_path)) as service, channel_to(service) as channel:
        reporter = HealthReporter(probe, service.server.set_serving, interval_s=0.05)
        reporter.start()
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        reporter.stop()
        after = {name: status_of(channel, name) for name in ("torchserve", "torchserve/pets")}
    assert len(calls) >= 3  # the thread keeps probing after a failure
    assert after == {"torchserve": NOT_SERVING, "torchserve/pets": NOT_SERVING}
