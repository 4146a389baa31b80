"""The Kubernetes objects of one launch: a Kubeflow Trainer `TrainJob` and the Secret with its token.

Field names are those of Kubeflow Trainer v2.3's CRD (`trainer.kubeflow.org/v1alpha1`, TrainJob):
`spec.runtimeRef` names the tuneserve ClusterTrainingRuntime (docker/k8s/trainer/), which holds the
image, the shared job volume and the torch ml-policy; `spec.trainer` says how many nodes, processes and
GPUs, and what to run. The command is plain `torchrun -m service.worker_app`: the Trainer injects the
PET_* variables (nodes, node rank, master address) that torchrun reads, so they are never set here.

The reporting token is not written into the TrainJob (anyone who may read TrainJobs would see it): it
lives in a Secret of its own, owned by the TrainJob so that Kubernetes deletes it with the TrainJob even
when this service is gone, and the trainer's env refers to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from service.jobs.launcher import REPORT_TOKEN_ENV
from service.jobs.local_launcher import WORKER_MODULE
from service.records import Job
from service.settings import Settings

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
TRAINJOB_API = f"{TRAINER_GROUP}/{TRAINER_VERSION}"
JOB_ID_LABEL = "tuneserve.io/job-id"
ATTEMPT_LABEL = "tuneserve.io/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "tuneserve"}
TOKEN_KEY = "token"
GPU_RESOURCE = "nvidia.com/gpu"
_NAME_LIMIT = 63  # the TrainJob's metadata.name (the Trainer's CEL rule; JobSet and pod names derive from it)
_SECRET_SUFFIX = "-report"


def trainjob_name(job: Job) -> str:
    """`<job id>-a<attempt>`, a DNS-1035 label: one TrainJob per attempt, so a retry never waits for the
    previous attempt's pods to be deleted."""
    suffix = f"-a{job.attempts}"
    stem = re.sub(r"[^a-z0-9-]+", "-", job.id.lower()).strip("-") or "job"
    if not stem[0].isalpha():
        stem = f"j-{stem}"
    return stem[: _NAME_LIMIT - len(suffix)].rstrip("-") + suffix


def secret_name(trainjob: str) -> str:
    return trainjob + _SECRET_SUFFIX


def labels(job: Job) -> dict[str, str]:
    return {**MANAGED_BY, JOB_ID_LABEL: job.id, ATTEMPT_LABEL: str(job.attempts)}


def worker_command(job: Job) -> list[str]:
    """What each node runs: torchrun reads PET_NNODES, PET_NODE_RANK, ... from the Trainer."""
    return ["torchrun", "-m", WORKER_MODULE, "--job-id", job.id]


def trainjob(job: Job, settings: Settings, env: Mapping[str, str]) -> dict[str, Any]:
    """The TrainJob of this attempt. `env` is the launcher's environment: only its TUNESERVE_* settings
    go to the pods (not this process's PATH, HOME, ...), and the token only by reference."""
    name = trainjob_name(job)
    resources = job.spec.resources
    trainer: dict[str, Any] = {
        "numNodes": resources.nodes,
        "numProcPerNode": resources.processes,
        "command": worker_command(job),
        "env": [*_setting_env(env), _token_env(secret_name(name))],
    }
    if resources.gpus:
        trainer["resourcesPerNode"] = {"limits": {GPU_RESOURCE: resources.gpus}}
    if settings.k8s_image:
        trainer["image"] = settings.k8s_image
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": settings.k8s_namespace, "labels": labels(job)},
        "spec": {
            "runtimeRef": {
                "apiGroup": TRAINER_GROUP,
                "kind": "ClusterTrainingRuntime",
                "name": settings.k8s_training_runtime,
            },
            "trainer": trainer,
        },
    }


def token_secret(job: Job, settings: Settings, token: str, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The Secret holding the attempt's reporting token, owned by the TrainJob `owner` (as created, with
    its uid): deleting the TrainJob deletes it."""
    metadata = owner["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(metadata["name"]),
            "namespace": settings.k8s_namespace,
            "labels": labels(job),
            "ownerReferences": [
                {
                    "apiVersion": TRAINJOB_API,
                    "kind": "TrainJob",
                    "name": metadata["name"],
                    "uid": metadata["uid"],
                }
            ],
        },
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def _setting_env(env: Mapping[str, str]) -> list[dict[str, str]]:
    return [
        {"name": key, "value": env[key]}
        for key in sorted(env)
        if key.startswith("TUNESERVE_") and key != REPORT_TOKEN_ENV
    ]


def _token_env(secret: str) -> dict[str, Any]:
    return {"name": REPORT_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}}
