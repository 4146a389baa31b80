"""`tuneserve serve --serving-only` as a real process: a serving replica over the control plane's store.

The control plane's state folder is laid out as the full service leaves it: two archives of `pets` in
`model_store/` (version 1 served; version 2 packaged but refused by the promotion gate, so absent
from `torchserve/served_models.json`, the control plane's real registry file). The replica gets its
own state folder and the store through --model-store, as in docker/k8s/serving-deployment.yaml.
It serves version 1 only, answers REST predictions equal to version 1's checkpoint in this process,
says ready (GET /ready) only once a prediction succeeds, opens no job API port, writes nothing into
the store, follows the control plane when it starts and stops serving version 2, and stops TorchServe
on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from handlers.inference import ImageClassifier
from service.packaging.archiver import build_archive
from service.packaging.mar_files import sha256_of
from service.packaging.served_registry import ServedRegistry, ServedVersion
from tests.ports import free_ports

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(600),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def control_plane(
    serving_checkpoint: Path, serving_checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A control plane's state folder: pets v1 served, pets v2 in the store but not served."""
    state = tmp_path_factory.mktemp("control-plane")
    store = state / "model_store"
    store.mkdir()
    served = build_archive(serving_checkpoint, store, "pets", "1")
    refused_checkpoint = state / "refused" / "best.pt"
    serving_checkpoint_factory(refused_checkpoint, seed=7)
    build_archive(refused_checkpoint, store, "pets", "2")
    registry = ServedRegistry(state / "torchserve" / "served_models.json")
    registry.add(
        "pets",
        ServedVersion(
            version="1", job_id="job-1", archive=served.path.name, sha256=served.sha256,
            checkpoint=str(serving_checkpoint), batch_size=1, max_batch_delay_ms=0, workers=1, top_k=3,
            served_at=time.time(),
        ),
        make_default=True,
    )  # fmt: skip
    return state


@pytest.fixture(scope="module")
def replica(
    control_plane: Path, serving_images: list[bytes], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("replica")
    api, ready, inference, management, metrics, grpc_inference, grpc_management = free_ports(7)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")},
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",  # one torch thread in TorchServe's worker: this CPU is shared
        "TUNESERVE_STATE_DIR": str(root / "state"),
        "TUNESERVE_PORT": str(api),  # the job API's port: must stay closed
        "TUNESERVE_TORCHSERVE_INFERENCE_PORT": str(inference),
        "TUNESERVE_TORCHSERVE_MANAGEMENT_PORT": str(management),
        "TUNESERVE_TORCHSERVE_METRICS_PORT": str(metrics),
        "TUNESERVE_TORCHSERVE_GRPC_INFERENCE_PORT": str(grpc_inference),
        "TUNESERVE_TORCHSERVE_GRPC_MANAGEMENT_PORT": str(grpc_management),
        "TUNESERVE_TORCHSERVE_JAVA_HEAP": "256m",
        "TUNESERVE_TORCHSERVE_TOKEN_AUTH": "false",  # as in serving-deployment.yaml
    }
    command = [
        sys.executable, "-m", "service.cli.main", "serve", "--serving-only",
        "--model-store", str(control_plane / "model_store"), "--ready-port", str(ready),
        "--sync-interval", "1",
    ]  # fmt: skip
    log_path = root / "replica.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, ready_url = f"http://127.0.0.1:{inference}", f"http://127.0.0.1:{ready}/ready"
    try:
        deadline = time.monotonic() + 300
        not_ready = []  # what /ready answered while starting
        while (status := http_status(ready_url)) != 200:
            not_ready.append(status)
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the replica did not get ready (exit {process.poll()}):\n{log_path.read_text()}")
            time.sleep(0.1)
        # at once, as a load balancer would: the first request after "ready" must be answered
        first = http_status(f"{url}/predictions/pets", serving_images[0])
        yield {
            "process": process, "url": url, "ready_url": ready_url, "api_port": api, "root": root,
            "log": log_path, "first_after_ready": first, "not_ready": not_ready,
        }  # fmt: skip
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        _kill_leftover_jvm(root / "state" / "torchserve" / "tmp" / ".model_server.pid")


def http_status(url: str, body: bytes | None = None) -> int:
    """The HTTP status of a GET (or of a POST of `body`); 0 when nothing answers."""
    headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=30) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _kill_leftover_jvm(pid_file: Path) -> None:
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        process = psutil.Process(int(pid_file.read_text().split()[0]))
        if "org.pytorch.serve.ModelServer" in process.cmdline():
            process.kill()


def predict(url: str, image: bytes) -> Any:
    request = urllib.request.Request(url, data=image, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def test_rest_answers_equal_the_served_versions_checkpoint(
    replica: dict[str, Any], serving_checkpoint: Path, serving_images: list[bytes]
):
    classifier = ImageClassifier.from_checkpoint(torch.load(serving_checkpoint, weights_only=True))
    expected = json.loads(json.dumps([classifier.handle([image])[0] for image in serving_images]))
    answers = [predict(f"{replica['url']}/predictions/pets", image) for image in serving_images]
    assert answers == expected


def test_ping_is_healthy_without_a_key(replica: dict[str, Any]):
    with urllib.request.urlopen(f"{replica['url']}/ping", timeout=10) as answer:
        assert json.loads(answer.read()) == {"status": "Healthy"}


def test_ready_only_once_predictions_are_answered(replica: dict[str, Any]):
    assert replica["first_after_ready"] == 200
    assert set(replica["not_ready"]) <= {0, 503}  # refused before it listened, then "not yet"
    with urllib.request.urlopen(replica["ready_url"], timeout=10) as answer:
        assert json.loads(answer.read()) == {
            "ready": True,
            "checks": {"torchserve": True, "torchserve/pets": True},
        }


def test_the_version_the_control_plane_does_not_serve_is_not_served(
    replica: dict[str, Any], serving_images: list[bytes]
):
    with pytest.raises(urllib.error.HTTPError) as refused:
        predict(f"{replica['url']}/predictions/pets/2", serving_images[0])
    assert refused.value.code == 404


def test_the_job_api_port_is_not_listening_and_no_job_store_is_made(replica: dict[str, Any]):
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", replica["api_port"]), 2),
    ):
        pass
    assert not (replica["root"] / "state" / "jobs.sqlite3").exists()
    log = replica["log"].read_text()
    assert "no training, no job API, no scheduler" in log
    assert "the control plane's served models" in log


def test_the_shared_store_is_only_read(replica: dict[str, Any], control_plane: Path):
    assert sorted(p.name for p in (control_plane / "model_store").iterdir()) == ["pets-v1.mar", "pets-v2.mar"]
    # the lock file is the control plane's (the fixture promoted version 1); the replica adds nothing
    served = sorted(p.name for p in (control_plane / "torchserve").iterdir())
    assert served == [".served_models.json.lock", "served_models.json"]


def answers_of(checkpoint: Path, images: list[bytes]) -> list[Any]:
    classifier = ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))
    return json.loads(json.dumps([classifier.handle([image])[0] for image in images]))


def wait_for(condition: Any, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def test_the_replica_follows_the_control_plane_serving_then_dropping_a_version(
    replica: dict[str, Any], control_plane: Path, serving_checkpoint: Path, serving_images: list[bytes]
):
    # runs after the tests above: it changes what the control plane serves
    url, store = replica["url"], control_plane / "model_store"
    registry = ServedRegistry(control_plane / "torchserve" / "served_models.json")
    v1 = answers_of(serving_checkpoint, serving_images)
    v2 = answers_of(control_plane / "refused" / "best.pt", serving_images)
    assert v1 != v2  # else the test could not tell them apart
    served_v2 = ServedVersion(
        version="2", job_id="job-2", archive="pets-v2.mar", sha256=sha256_of(store / "pets-v2.mar"),
        checkpoint="best.pt", batch_size=1, max_batch_delay_ms=0, workers=1, top_k=3, served_at=time.time(),
    )  # fmt: skip
    registry.add("pets", served_v2, make_default=True)  # the control plane served and promoted v2
    wait_for(
        lambda: http_status(f"{url}/predictions/pets", serving_images[0]) == 200
        and predict(f"{url}/predictions/pets", serving_images[0]) == v2[0],
        180, "the replica did not make version 2 its default", replica["log"],
    )  # fmt: skip
    assert [predict(f"{url}/predictions/pets", image) for image in serving_images] == v2
    assert [predict(f"{url}/predictions/pets/1", image) for image in serving_images] == v1

    registry.remove("pets", "2")  # and rolled back: version 2 unserved, 1 the default again
    wait_for(
        lambda: http_status(f"{url}/predictions/pets/2", serving_images[0]) == 404,
        60, "the replica still serves version 2", replica["log"],
    )  # fmt: skip
    assert [predict(f"{url}/predictions/pets", image) for image in serving_images] == v1
    assert http_status(replica["ready_url"]) == 200


def test_torchserve_killed_is_restarted_with_the_replicas_models(
    replica: dict[str, Any], serving_checkpoint: Path, serving_images: list[bytes]
):
    pid_file = replica["root"] / "state" / "torchserve" / "tmp" / ".model_server.pid"
    java = psutil.Process(int(pid_file.read_text().split()[0]))
    java.kill()  # the JVM dies: the supervisor's watchdog restarts TorchServe and registers the models
    java.wait(30)
    wait_for(lambda: http_status(replica["ready_url"]) == 503, 30, "/ready did not notice", replica["log"])
    wait_for(
        lambda: http_status(replica["ready_url"]) == 200, 240, "the replica did not come back", replica["log"]
    )
    assert [predict(f"{replica['url']}/predictions/pets", image) for image in serving_images] == answers_of(
        serving_checkpoint, serving_images
    )
    assert "TorchServe died; restarting it" in replica["log"].read_text()


def test_sigterm_stops_torchserve_and_exits_zero(replica: dict[str, Any]):
    # last in this module: it ends the replica the tests above share
    pid_file = replica["root"] / "state" / "torchserve" / "tmp" / ".model_server.pid"
    java = int(pid_file.read_text().split()[0])
    replica["process"].send_signal(signal.SIGTERM)
    assert replica["process"].wait(timeout=60) == 0
    assert not psutil.pid_exists(java) or psutil.Process(java).status() == psutil.STATUS_ZOMBIE
    assert "received SIGTERM; stopping TorchServe" in replica["log"].read_text()
