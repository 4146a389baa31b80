"""The container files, checked without a Docker engine: hadolint, kubernetes-validate --strict against
bundled schemas, the entrypoint run on the host, the health check against a real gRPC health server."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
K8S_VERSION = "1.37.0"  # the Makefile's K8S_VERSION


def tool(name: str) -> str:
    """A test dependency's executable: beside this interpreter (the venv), else on PATH."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} not found: it is in the `test` extra (make setup)"
    return found


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=60)


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSION, path)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in (DOCKER / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


# ---- Dockerfile ----


def test_hadolint_passes_the_dockerfile() -> None:
    result = run(tool("hadolint"), DOCKER / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = run(tool("hadolint"), bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_dockerfile_installs_with_the_shared_script() -> None:
    runs = [args for name, args in dockerfile_instructions() if name == "RUN"]
    assert any("TUNESERVE_EDITABLE=0" in r and "scripts/install.sh /opt/venv" in r for r in runs)


def test_dockerfile_runs_as_a_non_root_user_under_tini() -> None:
    instructions = dockerfile_instructions()
    user = [args for name, args in instructions if name == "USER"][-1]
    assert user.split(":")[0] == "10001"
    entrypoint = json.loads([args for name, args in instructions if name == "ENTRYPOINT"][-1])
    assert entrypoint == ["/usr/bin/tini", "--", "/app/docker/entrypoint.sh"]


# ---- entrypoint ----


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A venv whose `tuneserve` prints its pid, arguments and TUNESERVE_* settings."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "tuneserve"
    fake.write_text('#!/bin/sh\necho "pid=$$ args=$*"\nenv | grep "^TUNESERVE_" | sort\n')
    fake.chmod(0o755)
    return tmp_path / "venv"


def start_entrypoint(venv: Path, **env: str) -> tuple[int, int, dict[str, str]]:
    """Run the entrypoint as a host would: the shell's pid, the service's pid, the settings it saw."""
    base = {"PATH": os.environ["PATH"], "TUNESERVE_VENV": str(venv), "TUNESERVE_TORCHSERVE_ENABLED": "0"}
    result = run("/bin/sh", "-c", 'echo "$$"; exec "$0" --extra', DOCKER / "entrypoint.sh", env=base | env)
    assert result.returncode == 0, result.stderr
    shell_pid, service, *settings = result.stdout.splitlines()
    assert service.endswith("args=serve --extra")
    service_pid = service.split()[0].removeprefix("pid=")
    return int(shell_pid), int(service_pid), dict(line.split("=", 1) for line in settings)


def test_entrypoint_execs_the_service(fake_venv: Path) -> None:
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    shell_pid, service_pid, _ = start_entrypoint(fake_venv)
    assert service_pid == shell_pid  # exec all the way: the service is the process that gets SIGTERM


def test_entrypoint_on_a_host_keeps_the_settings_defaults(fake_venv: Path) -> None:
    *_, seen = start_entrypoint(fake_venv)
    assert "TUNESERVE_HOST" not in seen
    assert "TUNESERVE_STATE_DIR" not in seen


def test_entrypoint_in_a_container_defaults_to_the_volumes_and_keeps_set_values(fake_venv: Path) -> None:
    *_, seen = start_entrypoint(fake_venv, TUNESERVE_CONTAINER="1", TUNESERVE_HOST="10.1.2.3")
    assert seen["TUNESERVE_HOST"] == "10.1.2.3"
    assert seen["TUNESERVE_STATE_DIR"] == "/state"
    assert seen["TUNESERVE_DATA_ROOT"] == "/data"


def test_entrypoint_refuses_the_placeholder_token(fake_venv: Path) -> None:
    env = {"PATH": os.environ["PATH"], "TUNESERVE_VENV": str(fake_venv), "TUNESERVE_AUTH_TOKEN": "REPLACE-ME"}
    result = run(DOCKER / "entrypoint.sh", env=env)
    assert result.returncode == 1
    assert "placeholder" in result.stderr


# ---- health check ----


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def healthcheck(*args: str) -> int:
    """scripts/healthcheck.py's exit status (loaded from its file: scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "scripts" / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_healthcheck_passes_when_serving(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck("--address", address) == 0


def test_healthcheck_fails_when_not_serving(health_server: tuple[str, health.HealthServicer]) -> None:
    address, servicer = health_server
    servicer.set("tuneserve.v1.FineTuning", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck("--address", address, "--service", "tuneserve.v1.FineTuning") == 1


# ---- compose ----


def test_compose_reserves_a_gpu_and_mounts_datasets_read_only() -> None:
    service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["tuneserve"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert any(v.endswith(":/data:ro") for v in service["volumes"])


# ---- Kubernetes ----


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(manifest: Path) -> None:
    result = kubernetes_validate(manifest)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    bad = tmp_path / "deployment.yaml"
    typo = (K8S / "deployment.yaml").read_text().replace("readOnlyRootFilesystem:", "readOnlyRootFs:")
    bad.write_text(typo)
    result = kubernetes_validate(bad)
    assert result.returncode != 0
    assert "readOnlyRootFs" in result.stdout + result.stderr


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def seconds(duration: str | int) -> float:
    """Compose's "5m" / "90s", or Kubernetes' plain seconds."""
    if isinstance(duration, int):
        return duration
    return float(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def test_grace_periods_outlast_the_drain() -> None:
    drain_s = float(yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["TUNESERVE_DRAIN_GRACE_S"])
    pod = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["tuneserve"]
    assert float(compose["environment"]["TUNESERVE_DRAIN_GRACE_S"]) == drain_s
    # The margin covers TorchServe's stop after the drain.
    assert seconds(pod["terminationGracePeriodSeconds"]) >= drain_s + 30
    assert seconds(compose["stop_grace_period"]) >= drain_s + 30
