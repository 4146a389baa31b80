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
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.packaging.ts_config import inference_url, render_config
from service.settings import Settings

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


def stages() -> dict[str, list[tuple[str, str]]]:
    """The Dockerfile's instructions by stage name (`FROM x AS name`)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for name, args in dockerfile_instructions():
        if name == "FROM":
            current = found.setdefault(args.split()[-1], [])
        current.append((name, args))
    return found


def build_args() -> dict[str, str]:
    """The global ARG defaults (before the first FROM)."""
    found = {}
    for name, args in dockerfile_instructions():
        if name == "FROM":
            return found
        if name == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            found[key] = value.strip('"')
    return found


def test_one_dockerfile_builds_the_cpu_and_the_gpu_variant_on_pinned_bases() -> None:
    args, graph = build_args(), stages()
    assert args["VARIANT"] == "cpu"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["CPU_BASE"])
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", args["GPU_BASE"])
    assert graph["base-cpu"][0][1] == "${CPU_BASE} AS base-cpu"
    assert graph["base-gpu"][0][1] == "${GPU_BASE} AS base-gpu"
    assert any("uv python install 3.11." in a for n, a in graph["base-gpu"] if n == "RUN")  # no 3.11 on 24.04
    assert graph["base"][0][1] == "base-${VARIANT} AS base"
    assert ("ENV", "PYTHONUNBUFFERED=1") in graph["base"]


def test_the_final_stage_adds_only_a_headless_jre_17_tini_and_certificates() -> None:
    runtime = stages()["runtime"]
    assert runtime[0][1] == "base AS runtime"  # not the builder: no pip cache, no build context
    (install,) = [a for n, a in runtime if n == "RUN" and "apt-get install" in a]
    packages = install.split("--no-install-recommends", 1)[1].split("&&")[0].split()
    assert packages == ["openjdk-17-jre-headless", "tini", "ca-certificates"]
    copied = [a for n, a in runtime if n == "COPY" and a.startswith("--from=builder")]
    assert copied == ["--from=builder /opt/venv /opt/venv", "--from=builder /opt/torch /opt/torch"]


def test_the_builder_bakes_the_weights_build_arg_and_checks_the_bundled_lite0() -> None:
    builder = stages()["builder"]
    runs = [a for n, a in builder if n == "RUN"]
    assert any("fetch_weights.py --torch-home /opt/torch $WEIGHTS" in r for r in runs)
    assert any("lite0_weights_file" in r for r in runs)  # the build fails without EfficientNet-Lite0
    assert any("ts_gen" in r and "tuneserve_pb2_grpc" in r for r in runs)  # and without the stubs


def test_the_image_exposes_the_default_ports_but_not_torchserve_management() -> None:
    (exposed,) = [a for n, a in dockerfile_instructions() if n == "EXPOSE"]
    defaults = Settings.model_construct()  # the defaults alone, whatever TUNESERVE_* this shell has
    published = {
        defaults.port,
        defaults.torchserve_inference_port,
        defaults.torchserve_grpc_inference_port,
        defaults.torchserve_metrics_port,
        6006,  # `tuneserve tensorboard`'s default port
    }
    assert {int(p) for p in exposed.split()} == published
    assert defaults.torchserve_management_port not in published
    assert defaults.torchserve_grpc_management_port not in published


def test_the_healthcheck_runs_the_grpc_health_script_in_exec_form() -> None:
    (check,) = [a for n, a in dockerfile_instructions() if n == "HEALTHCHECK"]
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command == ["/opt/venv/bin/python", "/app/scripts/healthcheck.py"]
    assert ("COPY", "scripts/healthcheck.py /app/scripts/healthcheck.py") in stages()["runtime"]


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


def test_in_a_container_torchserve_publishes_inference_and_keeps_management_inside(
    fake_venv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("TUNESERVE_")]:
        monkeypatch.delenv(name)  # Settings below must see only what the entrypoint set
    *_, seen = start_entrypoint(fake_venv, TUNESERVE_CONTAINER="1")
    settings = Settings(**{k.removeprefix("TUNESERVE_").lower(): v for k, v in seen.items()})
    props = dict(
        line.split("=", 1) for line in render_config(settings).splitlines() if not line.startswith("#")
    )
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["grpc_inference_address"] == "0.0.0.0"
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["grpc_management_address"] == "127.0.0.1"
    assert inference_url(settings) == "http://127.0.0.1:8080"  # the service dials loopback, not 0.0.0.0


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


# ---- weights ----


def fetch_weights(*args: str) -> int:
    spec = importlib.util.spec_from_file_location("fetch_weights", ROOT / "scripts" / "fetch_weights.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_fetch_weights_takes_the_bundled_lite0_without_a_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*_args: object) -> None:
        raise AssertionError("fetch_weights looked at the network for weights it already has")

    monkeypatch.setattr("socket.getaddrinfo", no_network)
    assert fetch_weights("efficientnet_lite0", "--torch-home", str(tmp_path)) == 0


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


def test_the_pod_runs_as_the_image_user_with_a_gpu_and_grpc_health_probes() -> None:
    pod = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    user = [a for n, a in dockerfile_instructions() if n == "USER"][-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    api_port = int(yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["TUNESERVE_PORT"])
    probes = {name: container[name]["grpc"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["port"] for p in probes.values()} == {api_port}
    assert probes["readinessProbe"]["service"] == "tuneserve.v1.FineTuning"  # ready for jobs
    assert probes["livenessProbe"]["service"] == ""  # the whole server


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


# ---- Kubernetes: serving replicas (serve --serving-only) ----

SERVING_MANIFESTS = (
    "serving-deployment.yaml",
    "serving-service.yaml",
    "serving-hpa.yaml",
    "serving-pdb.yaml",
)


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return document


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels (or a Service's) selector picks a pod with these labels."""
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("name", SERVING_MANIFESTS)
def test_each_serving_manifest_exists_validates_strictly_and_is_applied(name: str) -> None:
    assert K8S / name in MANIFESTS  # so the glob-driven checks above cover it too
    result = kubernetes_validate(K8S / name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]


def test_the_hpa_scales_the_serving_deployment_on_cpu_and_the_pods_request_cpu() -> None:
    hpa, deployment = load("serving-hpa.yaml"), load("serving-deployment.yaml")
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"],
    )  # fmt: skip
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"]  # utilisation is a share of the request
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OMP_NUM_THREADS"] == str(container["resources"]["requests"]["cpu"])  # a thread per CPU
    assert "replicas" not in deployment["spec"]  # the HPA owns the count; apply must not reset it
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_pdb_and_the_service_select_the_serving_pods_and_only_them() -> None:
    serving_pod = load("serving-deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    control_pod = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    pdb = load("serving-pdb.yaml")
    assert (pdb["apiVersion"], pdb["kind"]) == ("policy/v1", "PodDisruptionBudget")
    serving_selectors = {
        "pdb": pdb["spec"]["selector"]["matchLabels"],
        "service": load("serving-service.yaml")["spec"]["selector"],
        "deployment": load("serving-deployment.yaml")["spec"]["selector"]["matchLabels"],
    }
    for name, selector in serving_selectors.items():
        assert selects(selector, serving_pod), name
        assert not selects(selector, control_pod), name
    # and the control plane's Deployment and Service never pick up a serving pod
    for selector in (
        load("deployment.yaml")["spec"]["selector"]["matchLabels"],
        load("service.yaml")["spec"]["selector"],
    ):
        assert not selects(selector, serving_pod)
    assert pdb["spec"]["minAvailable"] < load("serving-hpa.yaml")["spec"]["minReplicas"]  # drains can proceed


def test_the_training_control_plane_keeps_one_replica() -> None:
    spec = load("deployment.yaml")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"  # never two writers of the jobs database


def test_serving_pods_run_serving_only_over_the_state_volume_read_only_as_non_root() -> None:
    pod = load("serving-deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "--serving-only"
    assert container["image"] == load("deployment.yaml")["spec"]["template"]["spec"]["containers"][0]["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the model store is on the control plane's state claim, mounted read-only
    (state,) = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert volumes[state]["persistentVolumeClaim"] == {"claimName": "tuneserve-state", "readOnly": True}
    assert mounts[state]["readOnly"] is True
    assert Path(env["TUNESERVE_MODEL_STORE_DIR"]).is_relative_to(mounts[state]["mountPath"])
    # what the replica writes is on emptyDirs: its state folder (TorchServe's tmp, logs) and /tmp
    for folder in (env["TUNESERVE_STATE_DIR"], "/tmp"):
        (mount,) = [m for m in mounts.values() if Path(folder).is_relative_to(m["mountPath"])]
        assert "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly", False)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    user = [a for n, a in dockerfile_instructions() if n == "USER"][-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user


def test_serving_probes_ready_on_the_replicas_endpoint_and_live_on_torchserves_ping() -> None:
    (container,) = load("serving-deployment.yaml")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    inference = Settings.model_construct().torchserve_inference_port  # the replica's TorchServe listens here
    assert "TUNESERVE_TORCHSERVE_INFERENCE_PORT" not in env and ports["inference"] == inference
    assert env["TUNESERVE_TORCHSERVE_INFERENCE_HOST"] == "0.0.0.0"  # the kubelet reaches it on the pod IP
    assert f"--ready-port={ports['ready']}" in container["args"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ready", "port": "ready"}, probe
    # /ping without a key: only when TorchServe's token authorization is off
    assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "inference"}
    assert env["TUNESERVE_TORCHSERVE_TOKEN_AUTH"] == "false"
    service_ports = {p["name"]: p["targetPort"] for p in load("serving-service.yaml")["spec"]["ports"]}
    assert set(service_ports.values()) <= set(ports) - {"ready"}
