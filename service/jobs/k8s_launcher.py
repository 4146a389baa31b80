"""The Launcher of a worker as a Kubeflow Trainer TrainJob on Kubernetes (TUNESERVE_LAUNCHER=kubernetes).

start creates the attempt's TrainJob, then the Secret with its reporting token (service.jobs.
trainjob_manifest); a handle's ref is `namespace/name`. poll reads the TrainJob's conditions: Complete
is exit 0; Failed is exit 75 when a stop was asked for, 1 when the worker reported FAILED, else a crash
the scheduler retries (see service.jobs.launcher). A stop is not a signal here: the scheduler has already
told the intake, and every rank learns the reason from its next heartbeat reply and stops at a safe
point. kill and release delete the TrainJob (foreground: its pods go first) and its Secret. A TrainJob
outlives the replica that created it, so another replica adopts it (can_adopt) when that one dies.

The `kubernetes` client (the k8s extra) is imported here alone, when the launcher is built, so a service
that launches local processes runs without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from service.jobs.launcher import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    REPORT_TOKEN_ENV,
    FirstCall,
    LaunchError,
    WorkerExit,
    WorkerHandle,
)
from service.jobs.trainjob_manifest import (
    JOB_ID_LABEL,
    TRAINER_GROUP,
    TRAINER_VERSION,
    TRAINJOB_PLURAL,
    secret_name,
    token_secret,
    trainjob,
)
from service.records import Job
from service.settings import Settings

log = logging.getLogger(__name__)

EXIT_CRASHED = 3  # the TrainJob failed (or vanished) and the worker reported nothing: retried
NOT_FOUND = 404
CONFLICT = 409
TAKEOVER_DELETE_S = 60.0  # beyond cancel_grace_s: a leftover TrainJob's pods terminating
LEFTOVER_POLL_S = 1.0
MESSAGE_LIMIT = 1000  # an API server message that echoes a whole object is cut (after the redaction)

ReportedFailed = Callable[[str], bool]  # job id -> its worker has recorded FAILED


class KubernetesLauncher:
    """Workers as TrainJobs. `api_client` is a kubernetes.client.ApiClient (default: the in-cluster
    service account, else ~/.kube/config); `reported_failed` tells a worker's own failure from a crash."""

    def __init__(self, settings: Settings, reported_failed: ReportedFailed, api_client: Any = None) -> None:
        try:
            from kubernetes import client
        except ImportError as exc:
            raise RuntimeError(
                "TUNESERVE_LAUNCHER=kubernetes needs the kubernetes client: pip install 'tuneserve[k8s]'"
            ) from exc
        self.settings = settings
        self._reported_failed = reported_failed
        api_client = api_client if api_client is not None else _default_api_client()
        self._objects: Any = client.CustomObjectsApi(api_client)  # custom objects come back as dicts
        self._core = client.CoreV1Api(api_client)
        self._stopping: set[str] = set()  # refs asked to stop: their Failed TrainJob is a stop, not a crash
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the Launcher protocol

    def start(self, job: Job, devices: tuple[int, ...], env: Mapping[str, str]) -> WorkerHandle:
        # `devices` is () here: the cluster, not this machine, gives the job its GPUs
        token = env.get(REPORT_TOKEN_ENV, "")
        body = trainjob(job, self.settings, env)
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        created = self._create_trainjob(namespace, name, token, body)
        # the Secret after the TrainJob: its owner reference needs the TrainJob's uid (a pod that starts
        # before its Secret exists waits for it: the kubelet retries)
        try:
            secret = token_secret(job, self.settings, token, created)
            self._call(
                f"create Secret {namespace}/{secret_name(name)}",
                token,
                self._core.create_namespaced_secret,
                namespace,
                secret,
            )
        except LaunchError:
            self._delete(namespace, name)  # no TrainJob without its token: its workers could not report
            raise
        log.info("job %s: created TrainJob %s/%s", job.id, namespace, name)
        return WorkerHandle(job.id, f"{namespace}/{name}")

    def _create_trainjob(self, namespace: str, name: str, token: str, body: Mapping[str, Any]) -> Any:
        """Create the attempt's TrainJob. One of that name already there was left by a replica that lost
        the job (its lease ran out, and the attempt it counted was refunded at the re-queue) or by this
        service before a restart: no one runs it any more, so it is deleted and the create retried."""
        create = self._objects.create_namespaced_custom_object
        deadline = time.monotonic() + self.settings.cancel_grace_s + TAKEOVER_DELETE_S
        told = False
        while True:
            try:
                return create(TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, body)
            except Exception as exc:
                if _status(exc) != CONFLICT or time.monotonic() > deadline:
                    what = f"create TrainJob {namespace}/{name}"
                    raise LaunchError(
                        f"the Kubernetes API would not {what}: {describe(exc, token)}"
                    ) from None
            if not told:
                log.warning(
                    "TrainJob %s/%s exists already (left by a replica that lost the job, or before a "
                    "restart); deleting it to start this attempt anew",
                    namespace,
                    name,
                )
                self._delete(namespace, name)
                told = True
            time.sleep(LEFTOVER_POLL_S)  # foreground deletion: its pods go first

    def poll(self, handle: WorkerHandle) -> WorkerExit | None:
        namespace, name = split_ref(handle.ref)
        try:
            found = self._objects.get_namespaced_custom_object(
                TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name
            )
        except Exception as exc:
            if _status(exc) == NOT_FOUND:
                return WorkerExit(EXIT_CRASHED, f"TrainJob {handle.ref} was deleted before it finished")
            # the API server is briefly unreachable: look again at the next tick (a worker that is really
            # lost stops sending heartbeats and the scheduler kills it)
            log.warning("job %s: cannot read TrainJob %s: %s", handle.job_id, handle.ref, describe(exc, ""))
            return None
        return self._exit_of(handle, found)

    def stop(self, handle: WorkerHandle, reason: str) -> None:
        # the scheduler has told the intake: each rank reads `reason` in its next heartbeat reply
        with self._lock:
            self._stopping.add(handle.ref)
        log.info("job %s: TrainJob %s asked to stop (%s) by heartbeat", handle.job_id, handle.ref, reason)

    def kill(self, handle: WorkerHandle) -> None:
        self._delete(*split_ref(handle.ref))

    def release(self, handle: WorkerHandle) -> None:
        self._delete(*split_ref(handle.ref))
        with self._lock:
            self._stopping.discard(handle.ref)

    def stop_leftover(self, job_id: str, ref: str, grace_s: float) -> None:
        if "/" not in ref:
            return  # a local process's pid, not a TrainJob
        namespace = split_ref(ref)[0]
        # The workers stop by themselves: this new service does not know their token, so their next
        # heartbeat is refused and they checkpoint and exit ("draining"). Give them grace_s for it.
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.poll(WorkerHandle(job_id, ref)) is None:
            time.sleep(LEFTOVER_POLL_S)
        try:
            found = self._objects.list_namespaced_custom_object(
                TRAINER_GROUP,
                TRAINER_VERSION,
                namespace,
                TRAINJOB_PLURAL,
                label_selector=f"{JOB_ID_LABEL}={job_id}",
            )
        except Exception as exc:
            log.warning("job %s: cannot list its TrainJobs in %s: %s", job_id, namespace, describe(exc, ""))
            return
        for item in found.get("items", []):
            leftover = item["metadata"]["name"]
            log.warning(
                "job %s: deleting TrainJob %s/%s left by the last service", job_id, namespace, leftover
            )
            self._delete(namespace, leftover)

    def can_adopt(self, ref: str) -> bool:
        # a TrainJob runs in the cluster whatever became of the replica that created it; one in another
        # namespace was made by a service configured otherwise (this one's Role may not reach it)
        namespace, _, name = ref.partition("/")
        return bool(name) and namespace == self.settings.k8s_namespace

    def gpus_here(self, job: Job) -> int:
        return 0  # a TrainJob's pods ask the cluster for their GPUs: none of this machine's is held

    def placement(self, devices: tuple[int, ...]) -> str:
        return f"Kubernetes (namespace {self.settings.k8s_namespace})"

    def worth_waiting(self, job: Job, env: Mapping[str, str]) -> bool:
        return False  # no warm pod is kept: the TrainJob is created at once

    def first_call(self) -> FirstCall | None:
        # a TrainJob's pods may wait for GPUs long before its workers run and call
        return FirstCall(
            self.settings.k8s_start_timeout_s,
            "its TrainJob's workers did not start within {silent:.0f} s "
            "(TUNESERVE_K8S_START_TIMEOUT_S; are GPUs free, does the image pull?) and it was deleted",
        )

    # ------------------------------------------------------------------ helpers

    def _exit_of(self, handle: WorkerHandle, found: Mapping[str, Any]) -> WorkerExit | None:
        if found.get("metadata", {}).get("deletionTimestamp"):
            return WorkerExit(EXIT_CRASHED, f"TrainJob {handle.ref} is being deleted (killed)")
        conditions = {c.get("type"): c for c in found.get("status", {}).get("conditions", [])}
        if _true(conditions.get("Complete")):
            return WorkerExit(EXIT_OK, f"TrainJob {handle.ref} completed")
        failed = conditions.get("Failed")
        if not _true(failed):
            return None  # created, running, suspended (queued by the cluster): still under way
        assert failed is not None
        reason, message = failed.get("reason", "no reason"), failed.get("message", "")
        why = f"TrainJob {handle.ref} failed ({reason}: {message})"
        with self._lock:
            stopping = handle.ref in self._stopping
        if stopping:
            return WorkerExit(EXIT_STOPPED, f"{why} after a stop request")
        if self._reported_failed(handle.job_id):
            return WorkerExit(EXIT_FAILED, why)
        return WorkerExit(EXIT_CRASHED, f"{why}; see the logs of its pods")

    def _delete(self, namespace: str, name: str) -> None:
        """Delete the TrainJob (its pods first) and its Secret; what is gone already is fine."""
        calls: list[tuple[str, Callable[[], Any]]] = [
            (
                f"TrainJob {namespace}/{name}",
                lambda: self._objects.delete_namespaced_custom_object(
                    TRAINER_GROUP,
                    TRAINER_VERSION,
                    namespace,
                    TRAINJOB_PLURAL,
                    name,
                    propagation_policy="Foreground",
                ),
            ),
            (
                f"Secret {namespace}/{secret_name(name)}",
                lambda: self._core.delete_namespaced_secret(secret_name(name), namespace),
            ),
        ]
        for what, call in calls:
            try:
                call()
            except Exception as exc:
                if _status(exc) != NOT_FOUND:
                    log.warning("cannot delete %s: %s", what, describe(exc, ""))

    def _call(self, what: str, token: str, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:
            raise LaunchError(f"the Kubernetes API would not {what}: {describe(exc, token)}") from None


def split_ref(ref: str) -> tuple[str, str]:
    """`namespace/name` -> (namespace, name)."""
    namespace, _, name = ref.partition("/")
    return namespace, name


def describe(exc: BaseException, secret: str) -> str:
    """One line for people: the HTTP status and the API server's message, with `secret` blanked out
    (the client's own str() carries the response headers and body verbatim)."""
    status = _status(exc)
    if status is None:
        text = f"{type(exc).__name__}: {exc}"
    else:
        message = getattr(exc, "reason", "") or ""
        with contextlib.suppress(ValueError, AttributeError):  # not the API server's JSON Status
            message = json.loads(getattr(exc, "body", "") or "{}").get("message", message)
        text = f"HTTP {status}: {message}"
        if status in (401, 403):
            text += " (check the service account's Role: docker/k8s/trainer/rbac.yaml)"
    text = " ".join(text.split())
    if secret:
        text = text.replace(secret, "<redacted>")
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a kubernetes.client ApiException, None for anything else (no connection...)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and status > 0 else None


def _true(condition: Mapping[str, Any] | None) -> bool:
    return condition is not None and condition.get("status") == "True"


def _default_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # the pod's service account (docker/k8s/trainer/rbac.yaml)
    except config.ConfigException as in_pod:
        try:  # a developer's machine; KUBECONFIG read now (the client reads it once, at its import)
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except config.ConfigException as exc:
            raise RuntimeError(
                "TUNESERVE_LAUNCHER=kubernetes but there is no Kubernetes API to talk to: not in a pod "
                f"({in_pod}) and no kubeconfig ({exc}); run the service in the cluster with the service "
                "account of docker/k8s/trainer/rbac.yaml, or point KUBECONFIG at one"
            ) from exc
    return client.ApiClient()
