"""docker/k8s with the replicas and client-tokens components: two control-plane replicas on PostgreSQL.

Rendered by `kubectl kustomize` and validated with `kubernetes-validate --strict`, as the other docker/k8s
tests do. No Kubernetes API server or kubelet runs here: `kubelet_env` is a stand-in that resolves a
container's environment the way the kubelet does (envFrom ConfigMaps, secretKeyRef from the rendered
Secrets, fieldRef metadata.name from a pod name), and the service's own Settings and start-up check then
read that environment for real.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app import refuse_a_shared_torchserve_folder, refuse_replicas_on_sqlite
from service.errors import FailedPrecondition
from service.jobs.store_open import store_target
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
K8S_VERSION = "1.37.0"  # the Makefile's K8S_VERSION
POD_NAME = "tuneserve-5d8c7b9f4-x2k9q"


def kustomize(tmp_path: Path, components: list[str]) -> list[dict[str, Any]]:
    """docker/k8s with these components, as `kubectl kustomize` renders an overlay over it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    shutil.copytree(K8S, tmp_path / "base")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    listed = ", ".join(f"../base/{c}" for c in components)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [../base]\ncomponents: [{listed}]\n"
    )
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (tmp_path / "rendered.yaml").write_text(result.stdout)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    command = [str(tool), "--strict", "--kubernetes-version", K8S_VERSION, str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    documents = kustomize(tmp_path_factory.mktemp("k8s"), ["replicas", "client-tokens"])
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def control_plane(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return rendered[("Deployment", "tuneserve")]


def kubelet_env(rendered: dict[tuple[str, str], dict[str, Any]], pod_name: str) -> dict[str, str]:
    """Stand-in for the kubelet: the control-plane container's environment in a pod called `pod_name`."""
    (container,) = control_plane(rendered)["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= rendered[("ConfigMap", source["configMapRef"]["name"])]["data"]
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "secretKeyRef" in variable["valueFrom"]:
            ref = variable["valueFrom"]["secretKeyRef"]
            data = rendered[("Secret", ref["name"])]["stringData"]
            if ref["key"] in data or not ref.get("optional", False):
                env[variable["name"]] = data[ref["key"]]  # a missing key keeps a real pod from starting
        else:
            assert variable["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", variable
            env[variable["name"]] = pod_name
    return env


def settings_from(env: dict[str, str]) -> Settings:
    values = {k.removeprefix("TUNESERVE_").lower(): v for k, v in env.items() if k.startswith("TUNESERVE_")}
    return Settings(**values)


def written(rendered: dict[tuple[str, str], dict[str, Any]], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(list(rendered.values())))
    return path


def test_the_rendered_manifests_validate_strictly(
    rendered: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    assert ("PodDisruptionBudget", "tuneserve") in rendered and ("Secret", "tuneserve-database") in rendered
    result = kubernetes_validate(written(rendered, tmp_path / "rendered.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deployment/tuneserve " in result.stdout  # the patched Deployment was among those checked


def test_strict_validation_refuses_a_misspelt_downward_api_field(
    rendered: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    bad = written(rendered, tmp_path / "bad.yaml")
    bad.write_text(bad.read_text().replace("fieldPath: metadata.name", "fieldpath: metadata.name"))
    result = kubernetes_validate(bad)
    assert result.returncode != 0
    assert "deployment/tuneserve " in result.stdout and "fieldRef: 'fieldPath' is a required" in result.stdout


def test_two_replicas_roll_one_at_a_time_without_a_third(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    spec = control_plane(rendered)["spec"]
    assert spec["replicas"] == 2
    # never more pods than replicas (no third GPU) and never both down: one replica keeps the API and
    # claims the jobs the stopping one drains back into the queue
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    pod = spec["template"]["spec"]
    drain_s = float(rendered[("ConfigMap", "tuneserve-config")]["data"]["TUNESERVE_DRAIN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= drain_s + 30  # the drain finishes before SIGKILL
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_the_disruption_budget_keeps_one_control_plane_replica_and_no_serving_pod(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pdb = rendered[("PodDisruptionBudget", "tuneserve")]["spec"]
    control_labels = control_plane(rendered)["spec"]["template"]["metadata"]["labels"]
    serving_labels = rendered[("Deployment", "tuneserve-serving")]["spec"]["template"]["metadata"]["labels"]
    selector = pdb["selector"]["matchLabels"]
    assert all(control_labels.get(k) == v for k, v in selector.items())
    assert not all(serving_labels.get(k) == v for k, v in selector.items())
    assert 1 <= pdb["minAvailable"] < control_plane(rendered)["spec"]["replicas"]  # drains can proceed


def test_each_replica_reads_the_database_url_from_the_secret_and_its_pod_name_as_replica_id(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (container,) = control_plane(rendered)["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e.get("valueFrom", {}) for e in container["env"]}
    assert refs["TUNESERVE_DATABASE_URL"]["secretKeyRef"] == {"name": "tuneserve-database", "key": "url"}
    assert refs["TUNESERVE_REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    settings = settings_from(kubelet_env(rendered, POD_NAME))
    assert settings.resolved_replica_id == POD_NAME
    url = store_target(settings)
    assert isinstance(url, str) and url.startswith("postgresql://")  # the shared store, not a SQLite file
    refuse_replicas_on_sqlite(settings, url)  # what start_service checks first: accepted


def test_each_replica_runs_its_own_torchserve_over_the_shared_served_registry(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = control_plane(rendered)["spec"]["template"]["spec"]
    settings = settings_from(kubelet_env(rendered, POD_NAME))
    assert settings.torchserve_enabled  # the promotion gate runs in each replica's TorchServe
    refuse_a_shared_torchserve_folder(settings)  # what start_service checks: accepted
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def volume_of(path: Path) -> dict[str, Any]:
        mount = max((m for m in mounts if path.is_relative_to(m)), key=len)
        return volumes[mounts[mount]]

    # TorchServe's pid file, keys and config: the pod's own; the served registry: the shared state volume
    assert "emptyDir" in volume_of(settings.torchserve_dir)
    claim = volume_of(settings.served_registry_file)["persistentVolumeClaim"]["claimName"]
    assert claim == "tuneserve-state"
    assert settings.served_registry_file.parent != settings.torchserve_dir


def test_a_replica_whose_database_secret_is_empty_refuses_to_start(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    env = kubelet_env(rendered, POD_NAME) | {"TUNESERVE_DATABASE_URL": ""}
    settings = settings_from(env)
    with pytest.raises(FailedPrecondition, match=f"TUNESERVE_REPLICA_ID='{POD_NAME}'.*SQLite"):
        refuse_replicas_on_sqlite(settings, store_target(settings))


def test_the_state_volume_is_shared_read_write_by_every_replica(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert rendered[("PersistentVolumeClaim", "tuneserve-state")]["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = control_plane(rendered)["spec"]["template"]["spec"]
    (state,) = [
        v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "tuneserve-state"
    ]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == state["name"]]
    env = kubelet_env(rendered, POD_NAME)
    assert mount["mountPath"] == env["TUNESERVE_STATE_DIR"] and not mount.get("readOnly", False)


def test_the_client_tokens_secret_is_mounted_as_a_folder_where_the_setting_points(
    rendered: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = control_plane(rendered)["spec"]["template"]["spec"]
    env = kubelet_env(rendered, POD_NAME)
    tokens_file = Path(env["TUNESERVE_AUTH_TOKENS_FILE"])
    (volume,) = [
        v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "tuneserve-client-tokens"
    ]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    # no subPath: a subPath mount is never updated, and the service reloads the file when the Secret changes
    assert "subPath" not in mount and mount["readOnly"] is True
    (item,) = volume["secret"]["items"]
    assert Path(mount["mountPath"]) / item["path"] == tokens_file
    assert item["key"] in rendered[("Secret", "tuneserve-client-tokens")]["stringData"]
    assert "TUNESERVE_AUTH_TOKEN" in env  # the single token stays: one admin client


def test_the_base_alone_still_runs_one_replica_on_sqlite(tmp_path: Path) -> None:
    documents = kustomize(tmp_path, [])
    (deployment,) = [
        d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "tuneserve"
    ]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not names & {"TUNESERVE_DATABASE_URL", "TUNESERVE_REPLICA_ID"}
