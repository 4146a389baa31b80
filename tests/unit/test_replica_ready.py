"""A serving replica's GET /ready (service.packaging.replica_ready) over real HTTP on loopback.

The probe is a plain function here (the real one is TorchServeBackend.health, exercised against a
real TorchServe in tests/integration/test_serving_only.py).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from service.errors import FailedPrecondition
from service.packaging.replica_ready import ReadinessServer


def get(port: int, path: str = "/ready") -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def checks() -> dict[str, bool]:
    return {}


@pytest.fixture
def server(checks: dict[str, bool]) -> Iterator[ReadinessServer]:
    def probe() -> dict[str, bool]:
        if "raise" in checks:
            raise RuntimeError("TorchServe's management API answered garbage")
        return dict(checks)

    readiness = ReadinessServer("127.0.0.1", 0, probe)
    readiness.start()
    yield readiness
    readiness.stop()


def test_ready_when_torchserve_and_every_model_are(server: ReadinessServer, checks: dict[str, bool]) -> None:
    checks.update({"torchserve": True, "torchserve/pets": True})
    assert get(server.port) == (200, {"ready": True, "checks": checks})


def test_not_ready_while_a_model_has_no_ready_worker(
    server: ReadinessServer, checks: dict[str, bool]
) -> None:
    checks.update({"torchserve": True, "torchserve/pets": False})  # /ping alone would say Healthy here
    assert get(server.port) == (503, {"ready": False, "checks": checks})


def test_not_ready_with_nothing_checked_yet(server: ReadinessServer) -> None:
    assert get(server.port) == (503, {"ready": False, "checks": {}})


def test_a_failing_probe_is_not_ready_and_the_endpoint_keeps_answering(
    server: ReadinessServer, checks: dict[str, bool]
) -> None:
    checks["raise"] = True
    assert get(server.port)[0] == 503
    del checks["raise"]
    checks["torchserve"] = True
    assert get(server.port)[0] == 200


def test_other_paths_are_not_found(server: ReadinessServer) -> None:
    status, body = get(server.port, "/ping")
    assert status == 404 and "/ready" in body["error"]


def test_a_taken_port_is_refused_naming_the_option() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(FailedPrecondition, match="--ready-port"):
            ReadinessServer("127.0.0.1", taken.getsockname()[1], dict)
