"""The service's one typed settings object, read from environment variables prefixed `TUNESERVE_`.

Every folder the service writes hangs off `state_dir`, so one volume holds everything that must
survive a restart: the jobs database, job folders (checkpoints, logs), the model store.
"""

from __future__ import annotations

import os
import secrets
import socket
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


# TrainJobs at once when max_concurrent_jobs is not set: the cluster queues what it cannot place yet
K8S_CONCURRENT_JOBS = 4


class Settings(BaseSettings):
    """Ports, folders and limits. Frozen: pass it explicitly, never mutate it."""

    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", frozen=True, extra="ignore")

    # Folders
    state_dir: Path = Field(Path(".state"), description="jobs database, job folders, model store")
    # unset: the jobs live in <state_dir>/jobs.sqlite3; postgresql://USER:PASSWORD@HOST:5432/DB shares them
    # among service replicas (a secret: it holds the password)
    database_url: SecretStr | None = Field(None, description="the job store's database; default SQLite")
    data_root: Path = Field(Path("data"), description="datasets must live under this folder")
    torch_home: Path = Field(default_factory=_default_torch_home, description="torch hub cache (weights)")
    weights_root: Path | None = Field(
        None, description="a job's model.weights_file must be under this folder; default <state_dir>/weights"
    )
    model_store_dir: Path | None = Field(
        None,
        description="the model store (archives); default <state_dir>/model_store. A serving replica "
        "(serve --serving-only) points it at the control plane's store on a shared volume",
    )

    # gRPC API
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    auth_token: SecretStr | None = Field(
        None, description="bearer token required on every RPC but health; its client is an admin named admin"
    )
    auth_tokens_file: Path | None = Field(
        None, description="JSON file of clients (name, token_sha256, roles, limits), reloaded when it changes"
    )
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="set to require client certificates (mTLS)")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    grpc_workers: int = Field(16, ge=1)

    # Jobs
    max_concurrent_jobs: int | None = Field(
        None,
        ge=1,
        description="default: one per training GPU, one on a CPU-only machine; 4 TrainJobs on Kubernetes",
    )
    max_queued_jobs: int = Field(100, ge=1)
    max_job_retries: int = Field(2, ge=0, description="worker deaths retried from the last checkpoint")
    warm_workers: int = Field(
        1, ge=0, le=1, description="1: keep a spare worker with torch imported ready for the next job; 0: off"
    )
    # 0 by default: on a shared 2-core CPU its effect on the API's tail latency was within the noise, and
    # a nicer training job loses CPU to anything else at normal priority
    worker_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="workers run this much nicer than the service: on CPUs they share, the API's calls "
        "come first and training takes what they leave; 0: the same priority",
    )
    cancel_grace_s: float = Field(10.0, gt=0)
    drain_grace_s: float = Field(60.0, gt=0)
    # Several replicas on one PostgreSQL: each claims jobs with a lease it renews every lease_s / 3; a job
    # whose lease ran out (its replica died) is taken over by another: adopted when its worker runs on (a
    # TrainJob), else re-queued. Keep lease_s above report_lost_s, so a dead replica's local worker has
    # stopped itself before the job runs elsewhere.
    replica_id: str | None = Field(
        None, min_length=1, description="this replica's name in leases; default: hostname-pid-random"
    )
    lease_s: float = Field(30.0, gt=0, description="a claimed job's lease; renewed every lease_s / 3")

    # Reporting: workers report to the control plane over an internal gRPC API (not the job store)
    report_host: str = Field("127.0.0.1", description="the internal reporting API listens here (loopback)")
    report_port: int = Field(0, ge=0, le=65535, description="0: a free port, handed to each worker")
    report_heartbeat_s: float = Field(2.0, gt=0, description="a worker sends a heartbeat this often")
    report_lost_s: float = Field(
        10.0, ge=0, description="a worker that cannot reach the control plane this long stops (draining)"
    )
    worker_silence_s: float = Field(
        60.0, gt=0, description="a worker whose heartbeats stopped this long is killed and retried"
    )
    collective_timeout_s: float = Field(
        300.0, gt=0, description="DDP: a collective waits this long for a peer rank before the job fails"
    )
    report_advertise_address: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9.-]+:\d{1,5}$",
        description="host:port workers dial for the reporting API (on Kubernetes: the reporting Service's "
        "DNS name, e.g. tuneserve-reporting.<namespace>.svc:50052); default: the address it listens on",
    )
    # TLS of the reporting API: paths only (workers get them through their environment, never the keys)
    report_tls_cert: Path | None = Field(
        None, description="PEM certificate the reporting API serves (with report_tls_key and report_tls_ca)"
    )
    report_tls_key: Path | None = Field(None, description="PEM private key of report_tls_cert")
    report_tls_ca: Path | None = Field(
        None, description="PEM CA the workers trust for the reporting API (it signed report_tls_cert)"
    )
    report_allow_plaintext: bool = Field(
        False,
        description="kubernetes: serve the reporting API without TLS off loopback (the job tokens travel "
        "in clear); only where a service mesh already encrypts pod-to-pod traffic",
    )

    # Where workers run: child processes of this service, or Kubeflow Trainer TrainJobs on Kubernetes
    launcher: Literal["local", "kubernetes"] = Field(
        "local", description="local: processes on this machine (torchrun for DDP); kubernetes: TrainJobs"
    )
    k8s_namespace: str = Field(
        "default",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="kubernetes: the namespace of the TrainJobs and their Secrets (the service's own)",
    )
    k8s_training_runtime: str = Field(
        "tuneserve", min_length=1, description="kubernetes: the ClusterTrainingRuntime each TrainJob uses"
    )
    k8s_image: str | None = Field(
        None, description="kubernetes: the trainer image of each TrainJob; default: the runtime's image"
    )
    k8s_start_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="kubernetes: a TrainJob whose workers have not called this long after its creation "
        "(pods waiting for GPUs, an image that does not pull) is deleted and retried",
    )

    # GPUs: each job's worker sees only the GPUs the scheduler gave it (service.devices)
    gpu_count: int | None = Field(
        None, ge=0, le=1024, description="override/testing: GPUs to assume; default torch.cuda.device_count()"
    )
    serving_gpus: str | None = Field(
        None,
        pattern=r"^\s*(\d+\s*(,\s*\d+\s*)*)?$",
        description="comma-separated GPU indices for TorchServe; default: the last GPU; empty: none (CPU)",
    )
    train_on_serving_gpus: bool = Field(True, description="jobs may also train on the serving GPUs (shared)")

    # TorchServe
    torchserve_enabled: bool = True
    torchserve_files_dir: Path | None = Field(
        None,
        description="where this process's TorchServe keeps its config, keys, tmp and logs; default "
        "<state_dir>/torchserve. Control-plane replicas on one state volume each need their own (emptyDir)",
    )
    served_sync_s: float = Field(
        5.0, gt=0, description="TorchServe follows the served registry (what other replicas serve) this often"
    )
    torchserve_host: str = Field("127.0.0.1", description="management listens here; the service dials it")
    torchserve_inference_host: str | None = Field(
        None, description="inference (REST, gRPC) and metrics listen here; default: torchserve_host"
    )
    torchserve_inference_port: int = Field(8080, ge=0, le=65535)
    torchserve_management_port: int = Field(8081, ge=0, le=65535)
    torchserve_metrics_port: int = Field(8082, ge=0, le=65535)
    torchserve_grpc_inference_port: int = Field(7070, ge=0, le=65535)
    torchserve_grpc_management_port: int = Field(7071, ge=0, le=65535)
    torchserve_java_heap: str = Field("1g", pattern=r"^\d+[kmgKMG]$")
    torchserve_start_timeout_s: float = Field(180.0, gt=0)
    torchserve_token_auth: bool = True
    # TorchServe's Python workers forked from a process with torch imported (service.packaging.ts_zygote)
    torchserve_warm_workers: bool = True

    # Health: the job store's writability and the scheduler thread are probed this often
    health_interval_s: float = Field(2.0, gt=0)

    # TensorBoard started by the service for a job's logs
    tensorboard_host: str = "127.0.0.1"

    # Inputs
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images are refused (bombs)")

    @model_validator(mode="after")
    def _reporting_tls_is_whole(self) -> Settings:
        """A server certificate without its key, or without the CA its workers must trust, cannot work: the
        workers would fail every handshake. Refused here rather than at a job's first call."""
        given = {
            "TUNESERVE_REPORT_TLS_CERT": self.report_tls_cert,
            "TUNESERVE_REPORT_TLS_KEY": self.report_tls_key,
            "TUNESERVE_REPORT_TLS_CA": self.report_tls_ca,
        }
        missing = [name for name, value in given.items() if value is None]
        if missing and len(missing) < len(given):
            raise ValueError(
                f"the reporting API's TLS needs all of {list(given)}; {missing} not set (a server "
                "certificate, its key, and the CA that signed it, which the workers trust); set them all, "
                "or none for plaintext on loopback"
            )
        return self

    @model_validator(mode="after")
    def _workers_can_reach_the_reporting_api(self) -> Settings:
        """On Kubernetes the workers are pods: they dial a Service, never this process's loopback."""
        if self.launcher != "kubernetes":
            return self
        loopback = self.report_host in ("127.0.0.1", "localhost", "::1")
        if self.report_advertise_address is None or self.report_port == 0 or loopback:
            raise ValueError(
                "TUNESERVE_LAUNCHER=kubernetes needs TUNESERVE_REPORT_HOST off loopback (0.0.0.0), "
                f"TUNESERVE_REPORT_PORT fixed (not 0) and TUNESERVE_REPORT_ADVERTISE_ADDRESS, the reporting "
                "Service's host:port the worker pods dial (e.g. tuneserve-reporting.<namespace>.svc:50052; "
                f"see docker/k8s/trainer/); got report_host {self.report_host!r}, report_port "
                f"{self.report_port}, report_advertise_address {self.report_advertise_address!r}"
            )
        if self.report_tls_cert is None and not self.report_allow_plaintext:
            # each call carries a job's bearer token: in clear on the cluster network, anyone who can
            # read pod traffic could report as that job (or stop it); so TLS unless explicitly waived
            raise ValueError(
                "TUNESERVE_LAUNCHER=kubernetes serves the reporting API to the cluster network: set "
                "TUNESERVE_REPORT_TLS_CERT, TUNESERVE_REPORT_TLS_KEY and TUNESERVE_REPORT_TLS_CA (see "
                "docker/k8s/trainer/, Secret tuneserve-reporting-tls), or TUNESERVE_REPORT_ALLOW_PLAINTEXT="
                "true where a service mesh already encrypts pod traffic (the job tokens travel in clear)"
            )
        return self

    @property
    def report_tls(self) -> bool:
        """Whether the reporting API serves TLS (and its workers dial it with report_tls_ca)."""
        return self.report_tls_cert is not None

    @cached_property
    def jobs_db(self) -> Path:
        return self.state_dir / "jobs.sqlite3"

    @cached_property
    def weights_dir(self) -> Path:
        """Where users' own state_dicts (model.weights_file) must be: weights_root or <state_dir>/weights."""
        return self.weights_root if self.weights_root is not None else self.state_dir / "weights"

    @cached_property
    def jobs_dir(self) -> Path:
        return self.state_dir / "jobs"

    @cached_property
    def model_store(self) -> Path:
        return self.model_store_dir if self.model_store_dir is not None else self.state_dir / "model_store"

    @cached_property
    def torchserve_dir(self) -> Path:
        """This process's TorchServe's own files."""
        own = self.torchserve_files_dir
        return own if own is not None else self.state_dir / "torchserve"

    @cached_property
    def served_registry_file(self) -> Path:
        """What the control plane serves, shared by its replicas and followed by serving replicas
        (service.packaging.replica_models.control_plane_registry finds it from the model store)."""
        return self.state_dir / "torchserve" / "served_models.json"

    @cached_property
    def resolved_replica_id(self) -> str:
        """replica_id, or one made unique per process (a restarted process is a new replica)."""
        if self.replica_id is not None:
            return self.replica_id
        return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def resolved_max_concurrent_jobs(self) -> int:
        if self.max_concurrent_jobs is not None:
            return self.max_concurrent_jobs
        if self.launcher == "kubernetes":
            return K8S_CONCURRENT_JOBS  # the cluster's GPUs, not this machine's, bound them
        return max(1, len(self.training_gpus))

    @cached_property
    def gpus(self) -> tuple[int, ...]:
        """Indices of the GPUs this service sees (gpu_count when set, else what CUDA reports)."""
        if self.gpu_count is not None:
            return tuple(range(self.gpu_count))
        import torch  # deferred: settings are read in places that must start fast

        return tuple(range(torch.cuda.device_count()))

    @cached_property
    def serving_gpu_indices(self) -> tuple[int, ...]:
        """TorchServe's GPUs: serving_gpus, or the last GPU when it is not set (none on a CPU machine)."""
        if self.serving_gpus is None:
            return self.gpus[-1:]
        indices = tuple(sorted({int(part) for part in self.serving_gpus.split(",") if part.strip()}))
        unknown = [i for i in indices if i not in self.gpus]
        if unknown:
            raise ValueError(
                f"TUNESERVE_SERVING_GPUS {self.serving_gpus!r} names GPU {unknown[0]}, but this machine has "
                f"{len(self.gpus)} GPU(s) (indices {list(self.gpus)}); name existing ones, or leave it "
                "empty to serve on the CPU"
            )
        return indices

    @cached_property
    def training_gpus(self) -> tuple[int, ...]:
        """The GPUs jobs may be given: all of them, or all but the serving ones (train_on_serving_gpus)."""
        if self.train_on_serving_gpus:
            return self.gpus
        return tuple(i for i in self.gpus if i not in self.serving_gpu_indices)
