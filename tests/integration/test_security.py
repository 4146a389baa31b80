"""Who may call what: the bearer token on every RPC, TLS and mutual TLS, and no user-supplied pickle loaded.

Every method of both services is taken from the proto descriptor, so a new RPC is covered without
editing this file. Only health stays open (service.api.interceptors): probes need it without a secret.
Server reflection needs the token like every other RPC.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fuzzing import Method, all_methods
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from harness import FINAL, make_image_folder, make_settings, running_service, spec, wait_for
from reliability import record

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service
from service.errors import FailedPrecondition
from service.spec import ModelSpec
from service.training.checkpoints import load_checkpoint
from service.training.weights import read_state_dict, resolve_weights

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

TOKEN = "security-token-0123456789"
METHODS = all_methods()
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
BAD_HEADERS = {
    "no authorization metadata": (),
    "a wrong token": (("authorization", "Bearer not-the-token"),),
    "the token without `Bearer`": (("authorization", TOKEN),),
    "the token with one character more": (("authorization", f"Bearer {TOKEN}x"),),
    "another scheme": (("authorization", f"Basic {TOKEN}"),),
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("security")
    settings = make_settings(root, auth_token=TOKEN)
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as running:
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


def status_of(channel: grpc.Channel, method: Method, metadata: Any, payload: bytes = b"") -> grpc.StatusCode:
    """The status of `method` called with `payload` (by default an empty request, valid for every type)."""
    try:
        if method.server_streaming:
            list(channel.unary_stream(method.path)(payload, metadata=metadata, timeout=30))
        else:
            channel.unary_unary(method.path)(payload, metadata=metadata, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# ---------------------------------------------------------------------- the bearer token


@pytest.mark.parametrize("header", list(BAD_HEADERS), ids=list(BAD_HEADERS))
def test_every_rpc_refuses_a_call_without_the_right_token(channel: grpc.Channel, header: str) -> None:
    answered = {m.path: status_of(channel, m, BAD_HEADERS[header]) for m in METHODS}
    assert answered == dict.fromkeys(answered, UNAUTHENTICATED)
    record("security", f"every RPC ({len(METHODS)}) with {header}", len(METHODS), "UNAUTHENTICATED")


def test_every_rpc_lets_the_right_token_through(channel: grpc.Channel) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    answered = {m.path: status_of(channel, m, metadata) for m in METHODS}
    assert UNAUTHENTICATED not in answered.values(), answered
    record("security", f"every RPC ({len(METHODS)}) with the right token", len(METHODS), "reaches the RPC")


def test_an_unauthenticated_call_reaches_no_servicer(service: Service, channel: grpc.Channel) -> None:
    create = next(m for m in METHODS if m.name == "CreateJob")
    request = pb.CreateJobRequest(spec=spec("stranger")).SerializeToString()
    assert status_of(channel, create, (), request) == UNAUTHENTICATED
    assert service.store.list_jobs()[0] == []  # nothing was created


def test_reflection_needs_the_token_too(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert caught.value.code() == UNAUTHENTICATED
    # Not closed here: closing an intercepted channel closes the module's shared channel under it.
    authorized = grpc.intercept_channel(channel, _BearerToken(TOKEN))
    database = ProtoReflectionDescriptorDatabase(authorized)
    services = set(database.get_services())
    file = database.FindFileContainingSymbol("tuneserve.v1.FineTuning")
    assert {"tuneserve.v1.FineTuning", "tuneserve.v1.Inference"} <= services
    assert file.name == pb.DESCRIPTOR.name
    record(
        "security",
        "server reflection without a token, then with it",
        2,
        "UNAUTHENTICATED without; with the token it lists the services (as grpcurl -H would)",
    )


class _BearerToken(grpc.StreamStreamClientInterceptor):
    """Adds the token to reflection's stream-stream call, the way `grpcurl -H` does."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, requests)


# ---------------------------------------------------------------------- TLS and mutual TLS


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}-ca.key", folder / f"{name}-ca.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "1", "-subj", f"/CN={name} test CA")  # fmt: skip
    return key, cert


def make_signed(folder: Path, name: str, ca: tuple[Path, Path], extension: str) -> tuple[Path, Path]:
    """A key and a certificate for `name` signed by `ca`, with `extension` lines (SAN, usage)."""
    key, csr, cert, ext = (folder / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
    ext.write_text(extension)
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"
    )
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
            "-out", str(cert), "-days", "1", "-extfile", str(ext))  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, a client it signed, and a stranger's client."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(folder, "ours"), make_ca(folder, "other")
    server = make_signed(folder, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    client = make_signed(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = make_signed(folder, "stranger", other_ca, "extendedKeyUsage=clientAuth\n")
    return {
        "ca": ca[1], "server_key": server[0], "server_cert": server[1], "client_key": client[0],
        "client_cert": client[1], "stranger_key": stranger[0], "stranger_cert": stranger[1],
    }  # fmt: skip


def list_jobs_over(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    target = f"localhost:{port}"
    with grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.FineTuningStub(ch).ListJobs(
                pb.ListJobsRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def client_credentials(pki: dict[str, Path], who: str | None) -> grpc.ChannelCredentials:
    if who is None:
        return grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{who}_key"].read_bytes(),
        certificate_chain=pki[f"{who}_cert"].read_bytes(),
    )


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[int]:
    settings = make_settings(
        tmp_path_factory.mktemp("tls"),
        auth_token=TOKEN,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
    )
    with running_service(settings) as running:
        yield running.port


@pytest.fixture(scope="module")
def mtls_port(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[int]:
    settings = make_settings(
        tmp_path_factory.mktemp("mtls"),
        auth_token=TOKEN,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
    )
    with running_service(settings) as running:
        yield running.port


def test_tls_serves_a_client_that_trusts_the_ca(tls_port: int, pki: dict[str, Path]) -> None:
    assert list_jobs_over(tls_port, client_credentials(pki, None)) == grpc.StatusCode.OK
    record("security", "TLS with a CA-signed server certificate", 1, "a client trusting the CA is served")


def test_tls_refuses_a_plaintext_client(tls_port: int) -> None:
    assert list_jobs_over(tls_port, None) == grpc.StatusCode.UNAVAILABLE
    record("security", "a plaintext client to the TLS port", 1, "refused at the handshake (UNAVAILABLE)")


def test_tls_refuses_a_client_that_does_not_trust_the_certificate(
    tls_port: int, pki: dict[str, Path]
) -> None:
    untrusting = grpc.ssl_channel_credentials(root_certificates=pki["stranger_cert"].read_bytes())
    assert list_jobs_over(tls_port, untrusting) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_port: int, pki: dict[str, Path]) -> None:
    assert list_jobs_over(mtls_port, client_credentials(pki, None)) == grpc.StatusCode.UNAVAILABLE
    record("security", "mutual TLS, a client without a certificate", 1, "refused at the handshake")


def test_mutual_tls_refuses_a_certificate_of_another_ca(mtls_port: int, pki: dict[str, Path]) -> None:
    assert list_jobs_over(mtls_port, client_credentials(pki, "stranger")) == grpc.StatusCode.UNAVAILABLE
    record("security", "mutual TLS, a client certificate signed by another CA", 1, "refused at the handshake")


def test_mutual_tls_serves_a_client_the_ca_signed(mtls_port: int, pki: dict[str, Path]) -> None:
    assert list_jobs_over(mtls_port, client_credentials(pki, "client")) == grpc.StatusCode.OK
    record("security", "mutual TLS, a client certificate signed by the CA", 1, "served")


# ---------------------------------------------------------------------- no pickle is ever loaded


class Booby:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def booby_trapped(path: Path, marker: Path) -> Path:
    """A file shaped like a state_dict whose one value is a pickled object with a side effect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": Booby(marker)}, path)
    return path


def test_a_pickled_object_in_a_weights_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = booby_trapped(tmp_path / "evil.pt", marker)
    model_spec = ModelSpec(architecture="resnet18", weights="file", weights_file=str(weights))
    resolved = resolve_weights(model_spec, tmp_path, weights_root=tmp_path)
    with pytest.raises(FailedPrecondition, match=r"cannot read weights file .*evil\.pt"):
        read_state_dict(resolved, torch.nn.Linear(2, 2))
    assert not marker.exists()


def test_a_pickled_object_in_a_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = booby_trapped(tmp_path / "checkpoints" / "last.pt", marker)
    with pytest.raises(FailedPrecondition, match=r"last\.pt"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_job_given_a_booby_trapped_weights_file_fails_naming_it_and_nothing_runs(
    service: Service, channel: grpc.Channel
) -> None:
    marker = service.settings.state_dir.parent / "pwned-by-job"
    booby_trapped(service.settings.weights_dir / "uploads" / "evil.pt", marker)
    client = pb_grpc.FineTuningStub(channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    trapped = spec("trapped", model={"weights": "file", "weights_file": "uploads/evil.pt"})
    job = client.CreateJob(pb.CreateJobRequest(spec=trapped), metadata=auth)

    def ended() -> pb.Job | None:
        current = client.GetJob(pb.GetJobRequest(job_id=job.id), metadata=auth)
        return current if current.state in FINAL else None

    final = wait_for(ended, timeout=180, what=f"job {job.id} to end")
    assert final.state == pb.FAILED
    assert "evil.pt" in final.error and "weights" in final.error
    assert not marker.exists()
    record(
        "security",
        "a weights file (and a checkpoint) holding a pickled object with a side effect",
        3,
        "refused (weights_only=True), the job FAILED naming the file; the side effect never happened",
    )
