"""The Kubernetes launcher (TrainJobs of Kubeflow Trainer v2.3) and what is deployed with it.

No Kubernetes API server can run here. The launcher is driven through the official `kubernetes` client
against a STAND-IN API server (tests/k8s_api_standin.py: http.server on loopback, speaking the REST
paths of TrainJobs and Secrets, validating every body strictly against the Trainer CRD or Kubernetes'
own schema and refusing unknown fields with 422 as the API server does). It runs no Trainer controller:
the tests write the TrainJob conditions the controller would. Everything around it is real: the job
store, the intake, the scheduler, the CRD schemas, kubernetes-validate, kustomize.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_api_standin import K8S_VERSION, StandInApiServer, running_standin, write_kubeconfig
from k8s_crds import assert_valid, crd_folder, errors
from k8s_pod_runner import PodRunner
from pydantic import ValidationError
from tls_pki import make_pki

from tests.ports import free_ports

kubernetes = pytest.importorskip("kubernetes", reason="the k8s extra (pip install 'tuneserve[k8s]')")

from service.app import Service, start_service  # noqa: E402
from service.errors import FailedPrecondition  # noqa: E402
from service.jobs.admission import admit  # noqa: E402
from service.jobs.intake import Intake  # noqa: E402
from service.jobs.k8s_launcher import EXIT_CRASHED, KubernetesLauncher  # noqa: E402
from service.jobs.launcher import (  # noqa: E402
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    REPORT_ADDRESS_ENV,
    REPORT_TOKEN_ENV,
    LaunchError,
    WorkerHandle,
    worker_env,
)
from service.jobs.scheduler import Scheduler  # noqa: E402
from service.jobs.store import JobStore  # noqa: E402
from service.jobs.store_open import store_target  # noqa: E402
from service.jobs.trainjob_manifest import JOB_ID_LABEL, TOKEN_KEY, trainjob  # noqa: E402
from service.records import EventKind, Job, JobState  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.spec import JobSpec  # noqa: E402

pytestmark = pytest.mark.skipif(crd_folder() is None, reason="no k8s-crds folder (see tests/k8s_crds.py)")

ROOT = Path(__file__).resolve().parents[2]
TRAINER_DIR = ROOT / "docker" / "k8s" / "trainer"
NS = "ml-team"
TOKEN = "tok-3f9a1c2b7d5e4a6f8091b2c3d4e5f607"
ADVERTISED = "tuneserve-reporting:50052"


def k8s_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "launcher": "kubernetes",
        "k8s_namespace": NS,
        "report_host": "0.0.0.0",
        "report_port": 50052,
        "report_advertise_address": ADVERTISED,
        "max_job_retries": 1,
        "cancel_grace_s": 5.0,
        # the manifest tests need no TLS; the whole service on the stand-in cluster below serves it
        "report_allow_plaintext": True,
        **overrides,
    }
    return Settings(**values)


def spec(nodes: int = 2, gpus: int | None = 4, **resources: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "scale-out",
            "model": {"architecture": "resnet18"},
            "data": {"path": "ds"},
            "training": {"batch_size": 64},
            "resources": {"nodes": nodes, "gpus": gpus, **resources},
        }
    )


def running_job(store: JobStore, job_spec: JobSpec) -> Job:
    job = store.create_job(job_spec)
    return store.transition(job.id, JobState.RUNNING, "test", expect=[JobState.QUEUED])


def launch_env(settings: Settings) -> dict[str, str]:
    return {**worker_env(settings), REPORT_ADDRESS_ENV: ADVERTISED, REPORT_TOKEN_ENV: TOKEN}


class Cluster:
    """The stand-in API server, a job store and a launcher talking to it through the real client."""

    def __init__(self, api: StandInApiServer, tmp_path: Path, **settings: Any) -> None:
        self.api = api
        self.settings = k8s_settings(tmp_path, **settings)
        self.store = JobStore(store_target(self.settings))  # the SQLite file, or the database_url given
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=api.url))
        self.launcher = KubernetesLauncher(self.settings, self.reported_failed, client)

    def reported_failed(self, job_id: str) -> bool:
        return self.store.get_job(job_id).state == JobState.FAILED

    def start(self, job_spec: JobSpec | None = None) -> tuple[Job, WorkerHandle]:
        job = running_job(self.store, job_spec or spec())
        return job, self.launcher.start(job, (), launch_env(self.settings))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_standin() as api:
        cluster = Cluster(api, tmp_path)
        yield cluster
        cluster.store.close()


# ---------------------------------------------------------------- what the launcher writes


def test_the_trainjob_is_valid_against_the_trainer_crd_and_asks_for_nodes_processes_and_gpus(
    tmp_path: Path,
) -> None:
    settings = k8s_settings(tmp_path)
    store = JobStore(settings.jobs_db)
    job = running_job(store, spec(nodes=2, gpus=4))
    document = json.loads(json.dumps(trainjob(job, settings, launch_env(settings))))
    assert_valid(document)
    assert document["spec"]["runtimeRef"]["name"] == "tuneserve"
    trainer = document["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 4}}
    assert trainer["command"] == ["torchrun", "-m", "service.worker_app", "--job-id", job.id]
    names = [e["name"] for e in trainer["env"]]
    assert not [n for n in names if n.startswith("PET_")]  # the Trainer injects them
    assert {"name": REPORT_ADDRESS_ENV, "value": ADVERTISED} in trainer["env"]
    assert document["metadata"]["labels"][JOB_ID_LABEL] == job.id
    store.close()


def test_the_token_reaches_the_trainjob_only_by_reference_to_a_secret(tmp_path: Path) -> None:
    settings = k8s_settings(tmp_path)
    store = JobStore(settings.jobs_db)
    document = trainjob(running_job(store, spec()), settings, launch_env(settings))
    assert TOKEN not in json.dumps(document)
    (token_env,) = [e for e in document["spec"]["trainer"]["env"] if e["name"] == REPORT_TOKEN_ENV]
    assert token_env["valueFrom"]["secretKeyRef"]["key"] == TOKEN_KEY
    # nothing of this process's own environment (PATH, HOME, ...) goes to the pods
    assert all(e["name"].startswith("TUNESERVE_") for e in document["spec"]["trainer"]["env"])
    store.close()


def test_a_cpu_job_asks_for_no_gpu_and_an_unknown_field_is_refused_by_the_schema(tmp_path: Path) -> None:
    settings = k8s_settings(tmp_path)
    store = JobStore(settings.jobs_db)
    cpu_job = running_job(store, spec(nodes=2, gpus=0, processes_per_node=2))
    document = trainjob(cpu_job, settings, launch_env(settings))
    assert_valid(document)
    assert "resourcesPerNode" not in document["spec"]["trainer"]
    document["spec"]["trainer"]["numProcsPerNode"] = 2  # a typo the API server would refuse
    assert any("numProcsPerNode" in e for e in errors(document))
    store.close()


def load_yaml(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((TRAINER_DIR / name).read_text()) if d]


def test_the_cluster_training_runtime_is_valid_and_mounts_the_shared_job_volume() -> None:
    (runtime,) = load_yaml("cluster-training-runtime.yaml")
    assert_valid(runtime)
    assert runtime["metadata"]["name"] == Settings().k8s_training_runtime
    assert runtime["spec"]["mlPolicy"]["torch"] == {}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = node["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims["state"] == "tuneserve-state" and mounts["state"] == "/state"
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] == 0  # tuneserve retries
    (ca,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert ca["secretName"] == "tuneserve-reporting-tls"
    assert ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the server's key


def test_a_typo_in_the_runtime_is_refused() -> None:
    (runtime,) = load_yaml("cluster-training-runtime.yaml")
    runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = "auto"  # Trainer 2.3 moved it to the TrainJob
    assert any("numProcPerNode" in e for e in errors(runtime))


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run(
        [str(tool), "--strict", "--kubernetes-version", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", ["rbac.yaml", "reporting-service.yaml"])
def test_the_built_in_kinds_validate_strictly(name: str) -> None:
    result = kubernetes_validate(TRAINER_DIR / name)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def rendered(tmp_path: Path) -> list[dict[str, Any]]:
    """docker/k8s with the trainer component, as `kubectl kustomize` renders it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    shutil.copytree(ROOT / "docker" / "k8s", tmp_path / "base")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../base]\ncomponents: [../base/trainer]\n"
    )
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (tmp_path / "rendered.yaml").write_text(result.stdout)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_the_trainer_component_renders_a_service_that_can_launch_trainjobs(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    config = by_kind[("ConfigMap", "tuneserve-config")]["data"]
    settings = Settings(**{k.removeprefix("TUNESERVE_").lower(): v for k, v in config.items()})
    assert settings.launcher == "kubernetes"  # and the reporting settings pass its check
    port = int(settings.report_advertise_address.rsplit(":", 1)[1])  # type: ignore[union-attr]
    service = by_kind[("Service", "tuneserve-reporting")]
    assert service["spec"]["ports"][0]["port"] == port
    pod = by_kind[("Deployment", "tuneserve")]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tuneserve" and pod["automountServiceAccountToken"] is True
    assert {"name": "reporting", "containerPort": settings.report_port} in pod["containers"][0]["ports"]
    assert by_kind[("PersistentVolumeClaim", "tuneserve-state")]["spec"]["accessModes"] == ["ReadWriteMany"]
    # TLS: the control plane mounts the whole Secret where its settings point; the pods the CA alone, at
    # the path the workers are told (TUNESERVE_REPORT_TLS_CA travels in their environment)
    assert settings.report_tls and not settings.report_allow_plaintext
    tls_dir = str(settings.report_tls_ca.parent)  # type: ignore[union-attr]
    assert settings.report_tls_cert.parent == settings.report_tls_key.parent == settings.report_tls_ca.parent  # type: ignore[union-attr]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    (volume,) = [name for name, secret in secrets.items() if secret == "tuneserve-reporting-tls"]
    assert mounts[volume]["mountPath"] == tls_dir and mounts[volume]["readOnly"] is True
    runtime = by_kind[("ClusterTrainingRuntime", "tuneserve")]
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    worker_pod = node["template"]["spec"]["template"]["spec"]
    (ca_volume,) = [
        v for v in worker_pod["volumes"] if v.get("secret", {}).get("secretName") == "tuneserve-reporting-tls"
    ]
    (ca_mount,) = [m for m in worker_pod["containers"][0]["volumeMounts"] if m["name"] == ca_volume["name"]]
    assert ca_mount["mountPath"] == tls_dir
    assert [i["path"] for i in ca_volume["secret"]["items"]] == [settings.report_tls_ca.name]  # type: ignore[union-attr]
    built_in = tmp_path / "built-in.yaml"
    built_in.write_text(yaml.safe_dump_all([d for d in rendered if d["kind"] != "ClusterTrainingRuntime"]))
    result = kubernetes_validate(built_in)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- against the stand-in API server


def test_start_creates_a_valid_trainjob_and_a_secret_owned_by_it(cluster: Cluster) -> None:
    _, handle = cluster.start()
    namespace, name = handle.ref.split("/")
    assert namespace == NS
    (created,) = cluster.api.trainjobs(NS).values()  # accepted: valid against the CRD
    assert created["metadata"]["name"] == name and TOKEN not in json.dumps(created)
    (secret,) = cluster.api.secrets(NS).values()
    assert secret["stringData"][TOKEN_KEY] == TOKEN
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("TrainJob", name, created["metadata"]["uid"])
    (token_env,) = [e for e in created["spec"]["trainer"]["env"] if e["name"] == REPORT_TOKEN_ENV]
    assert token_env["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def test_the_standin_refuses_an_unknown_field_with_422(cluster: Cluster) -> None:
    job = running_job(cluster.store, spec())
    body = trainjob(job, cluster.settings, launch_env(cluster.settings))
    body["spec"]["trainer"]["gpusPerNode"] = 4
    api = kubernetes.client.CustomObjectsApi(
        kubernetes.client.ApiClient(kubernetes.client.Configuration(host=cluster.api.url))
    )
    with pytest.raises(kubernetes.client.ApiException) as refused:
        api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", body)
    assert refused.value.status == 422 and "gpusPerNode" in refused.value.body
    assert cluster.api.trainjobs(NS) == {}


def test_poll_is_none_until_the_trainjob_has_a_final_condition(cluster: Cluster) -> None:
    _, handle = cluster.start()
    assert cluster.launcher.poll(handle) is None
    cluster.api.set_condition(NS, handle.ref.split("/")[1], "Created", "JobsCreationSucceeded")
    assert cluster.launcher.poll(handle) is None
    cluster.api.set_condition(NS, handle.ref.split("/")[1], "Complete", "JobSetCompleted")
    ended = cluster.launcher.poll(handle)
    assert ended is not None and ended.code == EXIT_OK


def failed(cluster: Cluster, handle: WorkerHandle) -> int:
    cluster.api.set_condition(NS, handle.ref.split("/")[1], "Failed", "JobSetFailed", "pod node-0 exited 1")
    ended = cluster.launcher.poll(handle)
    assert ended is not None
    return ended.code


def test_a_failed_trainjob_after_a_stop_request_is_a_stop(cluster: Cluster) -> None:
    _, handle = cluster.start()
    cluster.launcher.stop(handle, "cancelled")
    assert cluster.api.deletes("trainjobs") == []  # a stop is a request, not a deletion
    assert failed(cluster, handle) == EXIT_STOPPED


def test_a_failed_trainjob_whose_worker_reported_failed_is_a_failure(cluster: Cluster) -> None:
    job, handle = cluster.start()
    cluster.store.transition(job.id, JobState.FAILED, "training diverged", expect=[JobState.RUNNING])
    assert failed(cluster, handle) == EXIT_FAILED


def test_a_failed_trainjob_without_a_report_is_a_crash_the_scheduler_retries(cluster: Cluster) -> None:
    _, handle = cluster.start()
    code = failed(cluster, handle)
    assert code not in (EXIT_OK, EXIT_FAILED, EXIT_STOPPED)
    ended = cluster.launcher.poll(handle)
    assert (
        ended is not None
        and "JobSetFailed" in ended.description
        and "pod node-0 exited 1" in ended.description
    )


def test_a_trainjob_deleted_behind_the_launchers_back_is_a_crash(cluster: Cluster) -> None:
    _, handle = cluster.start()
    cluster.api.objects.pop(("trainjobs", *handle.ref.split("/")))
    ended = cluster.launcher.poll(handle)
    assert ended is not None and ended.code == EXIT_CRASHED and "deleted" in ended.description


def test_kill_deletes_the_trainjob_foreground_and_its_secret(cluster: Cluster) -> None:
    _, handle = cluster.start()
    cluster.launcher.kill(handle)
    assert cluster.api.trainjobs(NS) == {} and cluster.api.secrets(NS) == {}
    (delete,) = cluster.api.deletes("trainjobs")
    sent = delete.query.get("propagationPolicy", [None])[0] or (delete.body or {}).get("propagationPolicy")
    assert sent == "Foreground"
    cluster.launcher.release(handle)  # after the exit: gone already, and that is fine
    assert cluster.api.trainjobs(NS) == {}


def test_stop_leftover_deletes_the_trainjobs_of_that_job_only(cluster: Cluster) -> None:
    job, handle = cluster.start()
    other, other_handle = cluster.start()
    cluster.api.set_condition(NS, handle.ref.split("/")[1], "Failed", "JobSetFailed", "stopped: draining")
    cluster.launcher.stop_leftover(job.id, handle.ref, grace_s=5.0)
    assert list(cluster.api.trainjobs(NS)) == [other_handle.ref.split("/")[1]]
    assert [s["metadata"]["labels"][JOB_ID_LABEL] for s in cluster.api.secrets(NS).values()] == [other.id]
    listed = [r for r in cluster.api.requests if r.method == "GET" and r.name is None]
    assert listed[0].query["labelSelector"] == [f"{JOB_ID_LABEL}={job.id}"]


def test_stop_leftover_leaves_a_local_process_ref_alone(cluster: Cluster) -> None:
    cluster.start()
    requests = len(cluster.api.requests)
    cluster.launcher.stop_leftover("job-000000000000", "12345", grace_s=5.0)
    assert len(cluster.api.requests) == requests


def test_a_refused_secret_is_a_launch_error_without_the_token_and_leaves_no_trainjob(
    cluster: Cluster,
) -> None:
    cluster.api.refuse(403, "create", "secrets")
    with pytest.raises(LaunchError) as refused:
        cluster.start()
    message = str(refused.value)
    assert "HTTP 403" in message and "forbidden" in message and "rbac.yaml" in message
    assert TOKEN not in message and TOKEN not in repr(refused.value.__cause__)
    assert cluster.api.trainjobs(NS) == {}  # created, then deleted: no workers without their token


def test_a_refused_trainjob_is_a_launch_error_naming_it(cluster: Cluster) -> None:
    cluster.api.refuse(403, "create", "trainjobs")
    with pytest.raises(LaunchError, match=r"create TrainJob ml-team/job-[0-9a-f]+-a1: HTTP 403") as refused:
        cluster.start()
    assert TOKEN not in str(refused.value)


def test_the_role_grants_every_call_the_launcher_makes(cluster: Cluster) -> None:
    job, handle = cluster.start()
    cluster.launcher.poll(handle)
    cluster.launcher.kill(handle)
    cluster.launcher.stop_leftover(job.id, handle.ref, grace_s=0.1)
    verbs = {"POST": "create", "DELETE": "delete"}
    used = {(r.plural, verbs.get(r.method) or ("get" if r.name else "list")) for r in cluster.api.requests}
    role = next(d for d in load_yaml("rbac.yaml") if d["kind"] == "Role")
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    assert used <= granted, f"calls the Role does not allow: {used - granted}"
    assert ("secrets", "get") not in granted and ("secrets", "list") not in granted  # tokens stay unread


# ---------------------------------------------------------------- the scheduler, admission, settings


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_the_scheduler_cancels_a_trainjob_through_the_workers_heartbeat(cluster: Cluster) -> None:
    """Cancel: the worker (holding the token its pod reads from the Secret) learns it from its heartbeat;
    the TrainJob then fails as its ranks exit 75, and the job is CANCELLED with both objects deleted."""
    intake = Intake(cluster.store)
    scheduler = Scheduler(cluster.settings, cluster.store, cluster.launcher, intake, ADVERTISED, poll_s=0.05)
    scheduler.start()
    try:
        job = cluster.store.create_job(spec())
        scheduler.wake()
        (secret,) = wait_for(lambda: list(cluster.api.secrets(NS).values()))  # made after the TrainJob
        (name,) = cluster.api.trainjobs(NS)
        token = secret["stringData"][TOKEN_KEY]  # what the pod's env would hold
        assert intake.heartbeat(token, job.id) is None
        cluster.store.request_cancel(job.id)
        scheduler.wake()
        wait_for(lambda: intake.heartbeat(token, job.id) == "cancelled")
        assert cluster.api.trainjobs(NS)  # not deleted: it stops at a safe point
        cluster.api.set_condition(NS, name, "Failed", "JobSetFailed", "node-0 exited 1")
        wait_for(lambda: cluster.store.get_job(job.id).state == JobState.CANCELLED)
        wait_for(lambda: not cluster.api.trainjobs(NS) and not cluster.api.secrets(NS))
    finally:
        scheduler.stop(drain=False)


def test_the_scheduler_retries_a_crashed_trainjob_as_a_new_attempt(cluster: Cluster) -> None:
    intake = Intake(cluster.store)
    scheduler = Scheduler(cluster.settings, cluster.store, cluster.launcher, intake, ADVERTISED, poll_s=0.05)
    scheduler.start()
    try:
        job = cluster.store.create_job(spec(nodes=4, gpus=8))  # more GPUs than this machine has: fine
        scheduler.wake()
        (first,) = wait_for(lambda: list(cluster.api.trainjobs(NS)))
        cluster.api.set_condition(NS, first, "Failed", "JobSetFailed", "node-2 OOMKilled")
        (second,) = wait_for(lambda: [n for n in cluster.api.trainjobs(NS) if n != first])
        assert (first[-3:], second[-3:]) == ("-a1", "-a2")
        assert cluster.store.get_job(job.id).state == JobState.RUNNING
        assert any("OOMKilled" in e.message for e in cluster.store.events_after(job.id))
    finally:
        scheduler.stop(drain=False)


FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


class ServiceOnCluster:
    """The whole service (TorchServe off) with TUNESERVE_LAUNCHER=kubernetes, its client configured by a
    kubeconfig that points at the stand-in API server, and the stand-in pod runner playing the cluster."""

    def __init__(self, api: StandInApiServer, service: Service) -> None:
        self.api, self.service, self.store = api, service, service.store

    def submit(self, name: str) -> str:
        job_spec = spec(nodes=2, gpus=1).model_copy(update={"name": name})
        job_id = self.store.create_job(job_spec).id
        self.service.scheduler.wake()
        return job_id

    def wait_state(self, job_id: str, state: JobState) -> Job:
        wait_for(lambda: self.store.get_job(job_id).state == state, timeout=60.0)
        return self.store.get_job(job_id)

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.store.events_after(job_id)]


def tls_paths(pki: dict[str, Path]) -> dict[str, Path]:
    return {"report_tls_cert": pki["cert"], "report_tls_key": pki["key"], "report_tls_ca": pki["ca"]}


@pytest.fixture
def on_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServiceOnCluster]:
    api_port, report_port = free_ports(2)
    with running_standin() as api:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: use the kubeconfig
        settings = k8s_settings(
            tmp_path,
            port=api_port,
            torchserve_enabled=False,
            report_port=report_port,
            report_advertise_address=f"localhost:{report_port}",
            report_heartbeat_s=0.2,
            # TLS as deployed: the pods' workers dial it trusting the CA named in their environment
            report_allow_plaintext=False,
            **tls_paths(make_pki(tmp_path / "pki")),
        )
        service = start_service(settings)
        try:
            with PodRunner(api, NS, [sys.executable, str(FAKE_WORKER)]):
                yield ServiceOnCluster(api, service)
        finally:
            service.stop(drain=False)


@pytest.mark.slow
def test_a_trainjob_worker_reports_with_the_token_from_its_secret_and_the_job_succeeds(
    on_cluster: ServiceOnCluster,
) -> None:
    job_id = on_cluster.submit("ok-on-cluster")
    job = on_cluster.wait_state(job_id, JobState.SUCCEEDED)
    assert "fake worker started" in on_cluster.messages(job_id)  # it reached the advertised address
    assert on_cluster.service.settings.report_tls  # over TLS, trusting the CA its TrainJob's env named
    assert job.attempts == 1
    wait_for(lambda: not on_cluster.api.trainjobs(NS) and not on_cluster.api.secrets(NS))


@pytest.mark.slow
def test_a_cancel_reaches_the_trainjob_worker_through_its_heartbeat(on_cluster: ServiceOnCluster) -> None:
    job_id = on_cluster.submit("slow-on-cluster")
    wait_for(lambda: "fake worker started" in on_cluster.messages(job_id), timeout=60.0)
    on_cluster.store.request_cancel(job_id)
    on_cluster.service.scheduler.wake()
    on_cluster.wait_state(job_id, JobState.CANCELLED)
    stopping = [e for e in on_cluster.store.events_after(job_id) if e.message == "fake worker stopping"]
    assert [e.data["reason"] for e in stopping] == ["cancelled"]  # it stopped itself: no kill
    assert on_cluster.api.deletes("trainjobs")  # deleted after the exit, not before


@pytest.mark.slow
def test_a_trainjob_worker_that_reports_failed_is_not_retried_and_a_crash_is(
    on_cluster: ServiceOnCluster,
) -> None:
    failed = on_cluster.submit("fail-on-cluster")
    job = on_cluster.wait_state(failed, JobState.FAILED)
    assert job.attempts == 1 and "boom" in (job.error or "")
    crashed = on_cluster.submit("exit3-on-cluster")
    job = on_cluster.wait_state(crashed, JobState.FAILED)  # max_job_retries 1: two TrainJobs
    assert job.attempts == 2
    warnings = [e.message for e in on_cluster.store.events_after(crashed) if e.kind == EventKind.WARNING]
    assert any("exited with 3" in w and "retrying" in w for w in warnings)


@pytest.mark.slow
def test_a_trainjob_waiting_for_the_cluster_is_not_killed_for_silence_until_its_start_timeout(
    tmp_path: Path,
) -> None:
    """Pods may wait long for GPUs: before its workers' first call a TrainJob gets k8s_start_timeout_s,
    not worker_silence_s; past it, it is deleted and retried like a silent worker."""
    with running_standin() as api:
        patient = Cluster(api, tmp_path / "patient", worker_silence_s=0.2, k8s_start_timeout_s=600.0)
        intake = Intake(patient.store)
        scheduler = Scheduler(
            patient.settings, patient.store, patient.launcher, intake, ADVERTISED, poll_s=0.05
        )
        scheduler.start()
        try:
            job = patient.store.create_job(spec())
            scheduler.wake()
            (pending,) = wait_for(lambda: list(api.trainjobs(NS)))
            time.sleep(1.0)  # five times worker_silence_s
            assert list(api.trainjobs(NS)) == [pending] and api.deletes("trainjobs") == []
            assert patient.store.get_job(job.id).state == JobState.RUNNING
        finally:
            scheduler.stop(drain=False)
            patient.store.close()
        api.objects.clear()
        impatient = Cluster(api, tmp_path / "impatient", k8s_start_timeout_s=0.3)
        intake = Intake(impatient.store)
        scheduler = Scheduler(
            impatient.settings, impatient.store, impatient.launcher, intake, ADVERTISED, poll_s=0.05
        )
        scheduler.start()
        try:
            job = impatient.store.create_job(spec())
            scheduler.wake()
            wait_for(lambda: any(n.endswith("-a2") for n in api.trainjobs(NS)))
            assert any("did not start within" in e.message for e in impatient.store.events_after(job.id))
        finally:
            scheduler.stop(drain=False)
            impatient.store.close()


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    from imagefolders import make_image_folder

    make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=4)
    return tmp_path / "data"


def two_node_spec() -> JobSpec:
    from imagefolders import job_spec

    return job_spec(
        resources={"nodes": 2, "processes_per_node": 1}, training={"batch_size": 8, "device": "auto"}
    )


def test_two_nodes_are_admitted_with_the_kubernetes_launcher(tmp_path: Path, data_root: Path) -> None:
    admitted = admit(two_node_spec(), k8s_settings(tmp_path, data_root=data_root, gpu_count=0))
    assert admitted.spec.resources.nodes == 2
    assert admitted.spec.resources.gpus == 1  # the cluster's GPU per node, though this machine has none


def test_two_nodes_are_refused_with_local_workers_naming_the_fix(tmp_path: Path, data_root: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", data_root=data_root, gpu_count=0)
    with pytest.raises(FailedPrecondition) as refused:
        admit(two_node_spec(), settings)
    assert "spec.resources.nodes" in refused.value.message
    assert "no Kubernetes launcher" in refused.value.message
    assert "TUNESERVE_LAUNCHER=kubernetes" in refused.value.message


@pytest.mark.parametrize(
    "overrides",
    [{"report_advertise_address": None}, {"report_port": 0}, {"report_host": "127.0.0.1"}],
    ids=["no advertised address", "a random port", "loopback"],
)
def test_the_kubernetes_launcher_needs_a_reporting_api_the_pods_can_reach(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError, match="TUNESERVE_REPORT_ADVERTISE_ADDRESS"):
        k8s_settings(tmp_path, **overrides)


def test_the_trainjob_names_the_ca_for_its_workers_and_no_key_material(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = k8s_settings(tmp_path, report_allow_plaintext=False, **tls_paths(pki))
    store = JobStore(settings.jobs_db)
    document = trainjob(running_job(store, spec()), settings, launch_env(settings))
    store.close()
    env = {e["name"]: e for e in document["spec"]["trainer"]["env"]}
    assert env["TUNESERVE_REPORT_TLS_CA"]["value"] == str(pki["ca"].resolve())
    assert not any("PRIVATE KEY" in str(e.get("value", "")) for e in env.values())
