"""KServe manifests for an exported model: an InferenceService and the ClusterServingRuntime it runs on.

KServe's own TorchServe runtime pins an image whose torch cannot load these models, so the runtime
here runs *our* image's TorchServe, non-root with a read-only root filesystem (TorchServe writes its
logs, key file and unpacked archives under /tmp, an emptyDir). Field names follow KServe v0.20's CRDs
(serving.kserve.io/v1beta1 InferenceService, v1alpha1 ClusterServingRuntime; the tests validate
against them, ../shared/k8s-crds/); the command is KServe's TorchServe runtime's
(kserve/kserve config/runtimes/kserve-torchserve.yaml) plus --foreground, since the container's
main process must stay up.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from service.serving_types import Archive, ExportRequest

RUNTIME_NAME = "tuneserve-torchserve"
UID = 10001  # the image's user (docker/Dockerfile)
SCALE_CPU_PERCENT = 70  # scaleMetric cpu: works with KServe's Serverless and RawDeployment modes
INFERENCE_PORT = 8085  # keep in step with service.packaging.export (config.properties)
METRICS_PORT = 8082
MOUNT = "/mnt/models"
WORKING_DIR = "/tmp"  # an emptyDir: TorchServe writes key_file.json and logs/ there
PROBE_TIMEOUT_S = 5
RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}


def write_manifests(folder: Path, archive: Archive, request: ExportRequest) -> None:
    """kserve/inferenceservice.yaml and kserve/clusterservingruntime.yaml."""
    folder.mkdir()
    documents = {
        "inferenceservice.yaml": inference_service(archive, request),
        "clusterservingruntime.yaml": cluster_serving_runtime(request),
    }
    for name, document in documents.items():
        (folder / name).write_text(yaml.safe_dump(document, sort_keys=False))


def resource_name(model_name: str) -> str:
    """A Kubernetes name (RFC 1035 label) for a model name: lower case, '_' as '-'."""
    name = re.sub(r"[^a-z0-9-]", "-", model_name.lower()).strip("-")
    name = name if name and name[0].isalpha() else f"m-{name}"
    return name[:63].rstrip("-")


def inference_service(archive: Archive, request: ExportRequest) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": resource_name(archive.name),
            "labels": {"app.kubernetes.io/managed-by": "tuneserve"},
            "annotations": {
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "tuneserve.io/model": archive.name,
                "tuneserve.io/version": archive.version,
                "tuneserve.io/job": request.job_id,
            },
        },
        "spec": {
            "predictor": {
                "minReplicas": request.min_replicas,
                "maxReplicas": request.max_replicas,
                "scaleMetric": "cpu",
                "scaleTarget": SCALE_CPU_PERCENT,
                "model": {
                    "modelFormat": {"name": "pytorch"},
                    "runtime": RUNTIME_NAME,
                    "storageUri": request.storage_uri,
                    "resources": RESOURCES,
                },
            }
        },
    }


def readiness_probe() -> dict[str, Any]:
    """An exec probe of service.packaging.ts_ready against this runtime's config and key file."""
    return {
        "exec": {
            "command": [
                "python", "-m", "service.packaging.ts_ready",
                f"--ts-config={MOUNT}/config/config.properties",
                f"--key-file={WORKING_DIR}/key_file.json",
            ]
        },
        # the probe starts a Python and asks one URL per version: under a second on an idle node,
        # more on a busy one; its own HTTP timeout (ts_ready.TIMEOUT_S) stays below this
        "timeoutSeconds": PROBE_TIMEOUT_S,
        "periodSeconds": 5,
        "failureThreshold": 3,
    }  # fmt: skip


def cluster_serving_runtime(request: ExportRequest) -> dict[str, Any]:
    prometheus = {"prometheus.kserve.io/port": str(METRICS_PORT), "prometheus.kserve.io/path": "/metrics"}
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": {"name": RUNTIME_NAME, "labels": {"app.kubernetes.io/managed-by": "tuneserve"}},
        "spec": {
            "annotations": prometheus,
            "supportedModelFormats": [{"name": "pytorch", "version": "2", "autoSelect": False}],
            "protocolVersions": ["v1"],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": request.image,
                    "command": ["torchserve"],
                    "args": [
                        "--start",
                        "--foreground",
                        f"--model-store={MOUNT}/model-store",
                        f"--ts-config={MOUNT}/config/config.properties",
                    ],
                    "workingDir": WORKING_DIR,  # TorchServe writes key_file.json and logs/ here
                    "env": [
                        {"name": "HOME", "value": "/tmp"},
                        {"name": "LOG_LOCATION", "value": "/tmp/logs"},
                        {"name": "METRICS_LOCATION", "value": "/tmp/logs"},
                    ],
                    "ports": [{"name": "http1", "containerPort": INFERENCE_PORT, "protocol": "TCP"}],
                    # not a tcpSocket probe (the port opens 12.6 s before the snapshot's worker has
                    # loaded the model; 58 s on a busy 2-core machine, test_export_readiness measures
                    # it) nor an httpGet of /ping
                    # (400 without the key under token authorization): an exec of ts_ready, which asks
                    # the loopback management API, with the key file's management key, whether every
                    # snapshot version has a READY worker. Our image has it (the service package).
                    "readinessProbe": readiness_probe(),
                    "resources": RESOURCES,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
