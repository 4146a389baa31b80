"""The KServe manifests an export writes validate strictly against KServe v0.20's CRDs (tests/k8s_crds.py)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml
from k8s_crds import assert_valid, crd_folder, errors

from service.packaging import ts_ready
from service.packaging.kserve_manifests import cluster_serving_runtime, inference_service, resource_name
from service.serving_types import Archive, ExportRequest

pytestmark = pytest.mark.skipif(
    crd_folder() is None, reason="no shared/k8s-crds folder (see tests/k8s_crds.py)"
)

ARCHIVE = Archive(path=Path("/x/My_Pets-v3.mar"), sha256="0" * 64, name="My_Pets", version="3")
REQUEST = ExportRequest(job_id="job-1", target=Path("/out"), kserve=True, storage_uri="s3://bucket/pets")


def as_written(document: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(document))  # what kubectl would read from the file


def test_the_inference_service_is_valid():
    assert_valid(as_written(inference_service(ARCHIVE, REQUEST)))


def test_the_cluster_serving_runtime_is_valid():
    assert_valid(as_written(cluster_serving_runtime(REQUEST)))


def test_an_unknown_field_is_refused_where_the_schema_lists_properties():
    document = copy.deepcopy(inference_service(ARCHIVE, REQUEST))
    document["spec"]["predictor"]["model"]["storageUrl"] = "s3://typo"
    assert any("storageUrl" in e for e in errors(document))


def test_a_wrong_value_is_refused():
    document = copy.deepcopy(inference_service(ARCHIVE, REQUEST))
    document["spec"]["predictor"]["scaleMetric"] = "gpu"
    assert any("scaleMetric" in e for e in errors(document))
    runtime = copy.deepcopy(cluster_serving_runtime(REQUEST))
    runtime["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = "yes"
    assert any("readOnlyRootFilesystem" in e for e in errors(runtime))


def test_model_names_become_kubernetes_names():
    assert resource_name("My_Pets") == "my-pets"
    assert resource_name("7up") == "m-7up"
    assert inference_service(ARCHIVE, REQUEST)["metadata"]["name"] == "my-pets"


def test_the_readiness_probe_runs_ts_ready_on_the_runtimes_own_files():
    container = cluster_serving_runtime(REQUEST)["spec"]["containers"][0]
    probe = container["readinessProbe"]
    assert set(probe) == {"exec", "timeoutSeconds", "periodSeconds", "failureThreshold"}  # no tcpSocket
    command = probe["exec"]["command"]
    assert command[:3] == ["python", "-m", "service.packaging.ts_ready"]
    # the config TorchServe is started with, and the key file in the working directory it writes to
    config = next(a for a in container["args"] if a.startswith("--ts-config="))
    assert config in command
    assert f"--key-file={container['workingDir']}/key_file.json" in command
    # the module the probe names is importable, and its HTTP timeout stays below the probe's
    assert importlib.util.find_spec("service.packaging.ts_ready") is not None
    assert probe["timeoutSeconds"] > ts_ready.TIMEOUT_S


def test_a_probe_with_a_misspelt_field_is_refused():
    runtime = copy.deepcopy(cluster_serving_runtime(REQUEST))
    runtime["spec"]["containers"][0]["readinessProbe"]["exec"]["cmd"] = ["true"]
    assert any("cmd" in e for e in errors(runtime))
