"""docker/k8s with the replicas AND trainer components: two control planes on PostgreSQL whose worker pods
report through one Service to either of them. Rendered by `kubectl kustomize` and validated with
`kubernetes-validate --strict`, as tests/unit/test_k8s_replicas.py does (whose helpers these are); the
service's own Settings and start-up checks then read the environment a pod would get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_k8s_replicas import POD_NAME, control_plane, kubernetes_validate, kustomize, settings_from, written

from service.app import refuse_replicas_on_sqlite
from service.jobs.store_open import store_target

NAMESPACE = "ml"
Rendered = dict[tuple[str, str], dict[str, Any]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    documents = kustomize(tmp_path_factory.mktemp("k8s"), ["replicas", "trainer"])
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def pod_env(rendered: Rendered) -> dict[str, str]:
    """The control-plane container's environment as the kubelet resolves it, in pod POD_NAME of NAMESPACE."""
    (container,) = control_plane(rendered)["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= rendered[("ConfigMap", source["configMapRef"]["name"])]["data"]
    fields = {"metadata.name": POD_NAME, "metadata.namespace": NAMESPACE}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "secretKeyRef" in variable["valueFrom"]:
            ref = variable["valueFrom"]["secretKeyRef"]
            data = rendered[("Secret", ref["name"])]["stringData"]
            if ref["key"] in data or not ref.get("optional", False):
                env[variable["name"]] = data[ref["key"]]
        else:
            env[variable["name"]] = fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def test_replicas_with_trainjob_workers_validate_strictly(rendered: Rendered, tmp_path: Path) -> None:
    assert ("Service", "tuneserve-reporting") in rendered and ("Secret", "tuneserve-database") in rendered
    result = kubernetes_validate(written(rendered, tmp_path / "rendered.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deployment/tuneserve " in result.stdout


def test_the_reporting_service_reaches_both_replicas_on_their_reporting_port(rendered: Rendered) -> None:
    spec = control_plane(rendered)["spec"]
    assert spec["replicas"] == 2
    service = rendered[("Service", "tuneserve-reporting")]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["selector"].items())  # every replica's pod
    assert "sessionAffinity" not in service or service["sessionAffinity"] == "None"  # any replica will do
    (port,) = service["ports"]
    (container,) = spec["template"]["spec"]["containers"]
    assert port["targetPort"] in {p.get("name") for p in container["ports"]}


def test_each_replica_starts_on_the_shared_database_launching_trainjobs(rendered: Rendered) -> None:
    settings = settings_from(pod_env(rendered))  # the kubernetes launcher's own checks pass (TLS, Service)
    assert settings.launcher == "kubernetes"
    assert settings.resolved_replica_id == POD_NAME
    url = store_target(settings)
    assert isinstance(url, str) and url.startswith(
        "postgresql://"
    )  # grants shared: any replica takes reports
    refuse_replicas_on_sqlite(settings, url)
    assert settings.report_advertise_address == "tuneserve-reporting:50052"
