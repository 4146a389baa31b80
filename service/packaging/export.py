"""Export a packaged model version as a folder that a plain TorchServe (KServe's) serves.

The folder is KServe's TorchServe storage layout:
    model-store/<name>.mar          the archive, as packaged (it carries its handler's code)
    config/config.properties        TorchServe's config, with a model_snapshot that loads the model
    kserve/*.yaml                   with --kserve: an InferenceService and a ClusterServingRuntime
KServe mounts the storage URI at /mnt/models and runs `torchserve --start
--model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties`.
Layout and property names from KServe's docs ("Deploy a PyTorch Model with TorchServe
InferenceService", kserve.github.io/website/0.12/modelserving/v1beta1/torchserve/: config/ and
model-store/), KServe's runtime (kserve/kserve config/runtimes/kserve-torchserve.yaml: the command)
and TorchServe's KServe guide (pytorch/serve kubernetes/kserve/README.md: inference on 8085, metrics
on 8082 in Prometheus format, gRPC 7070, `model_snapshot` with minWorkers, maxWorkers, batchSize,
maxBatchDelay, responseTimeout).

Everything is written into a temporary sibling folder and renamed into place at the end, so a
failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from service.errors import FailedPrecondition, InvalidArgument
from service.packaging.kserve_manifests import write_manifests
from service.packaging.model_store import ModelStore
from service.packaging.ts_config import JOB_QUEUE_SIZE, NETTY_THREADS
from service.records import Job, JobState
from service.serving_types import Archive, Exported, ExportRequest

log = logging.getLogger(__name__)

MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storage URI's contents
INFERENCE_PORT = 8085  # KServe's TorchServe runtime expects inference here (TorchServe's KServe guide)
MANAGEMENT_PORT = 8081
METRICS_PORT = 8082
GRPC_INFERENCE_PORT = 7070
GRPC_MANAGEMENT_PORT = 7071
RESPONSE_TIMEOUT_S = 120
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The schemes KServe's storage initializer reads (v0.20): a PVC, object stores, HTTP(S), HDFS, OCI
# model cars and the Hugging Face hub.
STORAGE_SCHEMES = ("pvc", "s3", "gs", "https", "http", "hdfs", "webhdfs", "oci", "hf")
RUNTIME_MARKER = "handlers/inference.py"  # an archive that carries its handler's code (handler_runtime)


def check_request(request: ExportRequest) -> None:
    """Refuse a bad request before anything is read or written."""
    if not request.target.is_absolute():
        raise InvalidArgument(
            f"target folder {str(request.target)!r} is not absolute; "
            "give the full path of a new or empty folder"
        )
    for field, value, low in (
        ("batch_size", request.batch_size, 1),
        ("max_batch_delay_ms", request.max_batch_delay_ms, 0),
        ("workers", request.workers, 1),
        ("min_replicas", request.min_replicas, 0),
        ("max_replicas", request.max_replicas, 1),
    ):
        if value is not None and value < low:
            raise InvalidArgument(f"{field} is {value}; it must be {low} or more")
    if request.max_replicas < request.min_replicas:
        raise InvalidArgument(
            f"max_replicas {request.max_replicas} is below min_replicas {request.min_replicas}"
        )
    if request.kserve:
        check_storage_uri(request.storage_uri)
    elif request.storage_uri:
        raise InvalidArgument("storage_uri is only used with kserve; add --kserve or drop --storage-uri")
    _check_target(request.target)


def check_storage_uri(uri: str) -> None:
    if not uri:
        raise InvalidArgument(
            "storage_uri is required with kserve: where the exported folder will be, e.g. "
            "pvc://models/pets or s3://bucket/pets"
        )
    parsed = urlparse(uri)
    if parsed.scheme not in STORAGE_SCHEMES or not (parsed.netloc or parsed.path.strip("/")):
        raise InvalidArgument(
            f"storage_uri {uri!r} has an unknown scheme {parsed.scheme!r} (or no location); KServe reads "
            f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}"
        )


@dataclass(frozen=True)
class Batching:
    """The model_snapshot's numbers: TorchServe's dynamic batching and workers per replica."""

    batch_size: int = 8
    max_batch_delay_ms: int = 50
    workers: int = 1


def export_job(job: Job, request: ExportRequest, store: ModelStore) -> Exported:
    """Export the archive `request` names of `job`, batching as the request or else the job says."""
    check_request(request)
    archive = archive_to_export(job, request.version, store)
    serving = job.spec.serving
    batching = Batching(
        batch_size=_given(request.batch_size, serving.batch_size),
        max_batch_delay_ms=_given(request.max_batch_delay_ms, serving.max_batch_delay_ms),
        workers=_given(request.workers, serving.workers),
    )
    return export_archive(archive, request, batching)


def archive_to_export(job: Job, version: str, store: ModelStore) -> Archive:
    """The archive a request names: the job's own (`version` "" or its version), or another version of
    the job's model in the store. Only a SUCCEEDED job exports."""
    if job.state != JobState.SUCCEEDED or not job.result.archive_path or not job.result.archive_sha256:
        raise FailedPrecondition(
            f"job {job.id} is {job.state.value} with {'an' if job.result.archive_path else 'no'} archive; "
            "only a SUCCEEDED job's model can be exported"
        )
    own = store.verified(Path(job.result.archive_path), job.result.archive_sha256)
    if not version or version == own.version:
        return own
    return store.archive(own.name, version)


def export_archive(archive: Archive, request: ExportRequest, batching: Batching = Batching()) -> Exported:
    """Write the export folder for `archive` (checked by check_request first)."""
    check_request(request)
    if not _carries_runtime(archive.path):
        raise FailedPrecondition(
            f"{archive.path.name} was packaged before archives carried their handler's code, so it "
            "would not serve without tuneserve; export a version packaged since (re-train the job)"
        )
    target = request.target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        (staging / "model-store").mkdir()
        shutil.copyfile(archive.path, staging / "model-store" / f"{archive.name}.mar")
        (staging / "config").mkdir()
        (staging / "config" / "config.properties").write_text(render_config(archive, request, batching))
        if request.kserve:
            write_manifests(staging / "kserve", archive, request)
        files = tuple(sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()))
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s version %s to %s", archive.name, archive.version, target)
    return Exported(path=target, name=archive.name, version=archive.version, files=files)


def render_config(archive: Archive, request: ExportRequest, batching: Batching) -> str:
    """config.properties for KServe's TorchServe: public inference and metrics, private management."""
    snapshot = {
        "name": "startup.cfg",
        "modelCount": 1,
        "models": {
            archive.name: {
                archive.version: {
                    "defaultVersion": True,
                    "marName": f"{archive.name}.mar",
                    "minWorkers": batching.workers,
                    "maxWorkers": batching.workers,
                    "batchSize": batching.batch_size,
                    "maxBatchDelay": batching.max_batch_delay_ms,
                    "responseTimeout": RESPONSE_TIMEOUT_S,
                }
            }
        },
    }
    lines = {
        "inference_address": f"http://0.0.0.0:{INFERENCE_PORT}",
        "management_address": f"http://127.0.0.1:{MANAGEMENT_PORT}",  # models come from the snapshot
        "metrics_address": f"http://0.0.0.0:{METRICS_PORT}",
        "grpc_inference_address": "0.0.0.0",
        "grpc_inference_port": GRPC_INFERENCE_PORT,
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": GRPC_MANAGEMENT_PORT,
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "model_metrics_auto_detect": "true",  # the handler's batch-size counter reaches Prometheus
        # TS_* variables override these (KServe's runtime sets some; a test moves the ports)
        "enable_envvars_config": "true",
        "disable_token_authorization": str(not request.token_auth).lower(),
        "enable_model_api": "false",  # nothing registers models at run time: the snapshot does
        "install_py_dep_per_model": "false",
        "job_queue_size": JOB_QUEUE_SIZE,  # the service's TorchServe settings: the same server serves alike
        "number_of_netty_threads": NETTY_THREADS,
        "netty_client_threads": NETTY_THREADS,
        "default_response_timeout": RESPONSE_TIMEOUT_S,
        "max_request_size": MAX_MESSAGE_BYTES,
        "max_response_size": MAX_MESSAGE_BYTES,
        "model_store": f"{MOUNT}/model-store",
        "model_snapshot": json.dumps(snapshot, separators=(",", ":")),
    }
    # Java properties: a backslash is an escape, ':' and '=' in values are fine after the first '='
    body = "\n".join(f"{k}={str(v).replace(chr(92), chr(92) * 2)}" for k, v in lines.items())
    return (
        f"# Written by `tuneserve export` for {archive.name} version {archive.version} "
        f"(job's archive sha256 {archive.sha256}).\n" + body + "\n"
    )


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise FailedPrecondition(f"target {target} exists and is not a folder; choose a new folder")
    if target.is_dir() and any(target.iterdir()):
        raise FailedPrecondition(
            f"target folder {target} exists and is not empty; choose a new folder or empty it first"
        )
    if not target.parent.is_dir():
        raise FailedPrecondition(f"the parent folder {target.parent} does not exist; create it first")


def _carries_runtime(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as mar:
            return RUNTIME_MARKER in mar.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise FailedPrecondition(f"{path} is not a readable TorchServe archive ({exc})") from None


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished folder into place; an empty target folder is replaced (POSIX rename)."""
    try:
        os.rename(staging, target)
    except OSError as exc:  # ENOTEMPTY/EEXIST: someone wrote into the target meanwhile
        raise FailedPrecondition(
            f"cannot move the export into {target} ({exc.strerror}); is it empty?"
        ) from None
    os.chmod(target, 0o755)  # mkdtemp made it 0700
