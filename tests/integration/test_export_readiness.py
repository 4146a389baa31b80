"""The KServe runtime's readiness probe (service.packaging.ts_ready) against a real TorchServe serving an
exported folder: the session's plain TorchServe (tests/integration/conftest.py, KServe's command in a
virtualenv without tuneserve, ports moved by TS_* variables as the exported config allows), whose start
the fixture samples with the probe every second. test_export_serving.py checks the same server's answers.

The probe runs as a plain file with that virtualenv's Python, the way the kubelet's exec would run it
in the container (same environment): so it needs neither tuneserve's imports nor torch. It must say
"not ready" while the snapshot's model loads, even once the inference port accepts connections (what
the tcpSocket probe it replaces waited for), and "ready" once the model answers.
"""

from __future__ import annotations

import time

import pytest
from export_proof import EXPORTED_MODEL, EXPORTED_VERSION, StartedServer, probe_once

from tests.ports import free_ports

pytestmark = [pytest.mark.torchserve, pytest.mark.slow, pytest.mark.timeout(600)]


def test_not_ready_before_the_start(plain_torchserve: StartedServer):
    before = plain_torchserve.before_start
    assert before.probe_rc == 1 and "no key file" in before.probe_says  # nothing started yet


def test_not_ready_while_the_model_loads_ready_once_it_answers(plain_torchserve: StartedServer):
    samples = plain_torchserve.samples
    assert samples[-1].probe_rc == 0, f"never ready: {samples[-3:]}"
    assert f"{EXPORTED_MODEL} version {EXPORTED_VERSION}: READY" in samples[-1].probe_says
    # the window a tcpSocket probe would have let traffic in: port open, model not loaded yet
    loading = [s for s in samples if s.port_open and s.probe_rc == 1]
    assert loading, f"the port never opened before the model was ready: {samples}"
    assert all("not ready" in s.probe_says for s in samples[:-1])
    # ready means it answers: the prediction sent the moment the probe said so got its 200
    assert plain_torchserve.first_answer_status == 200
    print(  # the measurement for the notes: how long a tcpSocket probe would have been wrong
        f"port open while not ready: {loading[0].at_s:.1f} s to {samples[-1].at_s:.1f} s after start "
        f"({len(loading)} probes said not ready meanwhile)"
    )


def test_not_ready_when_torchserve_no_longer_answers(plain_torchserve: StartedServer):
    """As after a stop or a crash: the key file is still there, the management port answers nothing."""
    server = plain_torchserve.server
    (closed,) = free_ports(1)
    gone = probe_once(
        server, time.monotonic(), server.env | {"TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{closed}"}
    )
    assert server.key_file.is_file()
    assert gone.probe_rc == 1 and "is not answering" in gone.probe_says
