"""Property-based fuzzing of the serving RPCs against a model that the real TorchServe serves.

test_fuzz.py fuzzes every RPC with serving disabled, where the serving RPCs stop at "serving is off".
Here one service runs with its TorchServe, a tiny job trained for real is served as version 1 of `pets`
and a second checkpoint as version 2, and the requests lean towards that model's real name, versions
and job, so that they get past the lookups and reach TorchServe and the handler. Every answer must be
OK or a client error, and afterwards each version still serves exactly what its checkpoint predicts.

Version 1 is never unserved (nor the whole model): that would be a correct answer that leaves nothing
to check afterwards. Everything else, version 2 included, may be unserved or made the default.
"""

from __future__ import annotations

import functools
import io
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from fuzzing import Method, all_methods, messages, text
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import make_image_folder, spec, wait_for, wait_state
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability import record
from torchserve_service import running_torchserve_service

from handlers.inference import ImageClassifier
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service
from service.spec import ServingSpec

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(1200),
]

TOKEN = "fuzz-serving-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODEL = "pets"
CLASSES = ("class_0", "class_1")
CALL_TIMEOUT_S = 120.0
SERVING_RPCS = ("Predict", "ServeJob", "UnserveModel", "SetDefaultVersion", "ListServedModels")
METHODS = [m for m in all_methods() if m.name in SERVING_RPCS]
# With a model served, nothing a client sends may take TorchServe away: UNAVAILABLE is not allowed here.
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
FUZZ = settings(
    deadline=None,  # the machine is shared: a slow case is not a failure
    database=None,  # leave no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fuzz-serving")
    make_image_folder(root / "data" / "ds")
    with running_torchserve_service(root, auth_token=TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def served(
    service: Service,
    channel: grpc.Channel,
    serving_checkpoint_factory: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """`pets` version 1 (a tiny job trained for real, served by ServeJob) and version 2 (a checkpoint
    deployed directly, now the default); the job ids fuzzing draws from; each version's checkpoint."""
    client = pb_grpc.FineTuningStub(channel)
    job = client.CreateJob(pb.CreateJobRequest(spec=spec(MODEL)), metadata=AUTH)
    final = wait_state(WithToken(client), job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=600)
    assert final.state == pb.SUCCEEDED, final.error
    first = client.ServeJob(pb.ServeJobRequest(job_id=job.id), metadata=AUTH, timeout=600)
    assert (first.name, first.version) == (MODEL, "1")

    second = tmp_path_factory.mktemp("v2") / "best.pt"
    serving_checkpoint_factory(second, class_names=CLASSES, seed=3)
    archive = service.backend.package(second, MODEL)
    serving = ServingSpec(model_name=MODEL, batch_size=4, max_batch_delay_ms=50, workers=1, top_k=2)
    service.backend.deploy(archive, job_id="job-v2", checkpoint=second, serving=serving)

    # a job that exists but has no archive: ServeJob of it is a FAILED_PRECONDITION
    unfinished = client.CreateJob(
        pb.CreateJobRequest(spec=spec("unfinished", training={"epochs": 500})), metadata=AUTH
    )
    client.CancelJob(pb.CancelJobRequest(job_id=unfinished.id), metadata=AUTH)
    wait_state(WithToken(client), unfinished.id, (pb.CANCELLED,), timeout=120)
    return {
        "job_ids": [job.id, unfinished.id],
        "checkpoints": {"1": Path(final.result.best_checkpoint), "2": second},
    }


class WithToken:
    """A FineTuning stub whose calls carry the token (harness.wait_state calls GetJob without metadata)."""

    def __init__(self, client: pb_grpc.FineTuningStub) -> None:
        self.client = client

    def GetJob(self, request: pb.GetJobRequest) -> pb.Job:
        return self.client.GetJob(request, metadata=AUTH, timeout=30)


# ---------------------------------------------------------------------- requests


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_png_header() -> bytes:
    """A PNG whose header claims 60000x60000 pixels (a decompression bomb), with no pixel data."""
    real = _png(1, 1)
    header = bytearray(real[:33])
    header[16:24] = (60000).to_bytes(4, "big") * 2  # IHDR width and height (the CRC is now wrong)
    return bytes(header)


def image_payloads(real: list[bytes]) -> st.SearchStrategy[bytes]:
    """Real pictures, their broken copies, and bytes that only look like an image."""
    tiny = _png(1, 1)
    return st.one_of(
        st.sampled_from(real),
        st.sampled_from(real).flatmap(lambda image: st.integers(0, len(image)).map(lambda n: image[:n])),
        st.binary(max_size=256),
        st.sampled_from([b"", tiny, _huge_png_header(), b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff"]),
    )


ODD_VERSIONS = st.one_of(st.sampled_from(["3", "01", " 1", "1.0", "-1", "1/../2"]), text())
TOP_K = st.one_of(st.integers(-3, 5), st.sampled_from([2**31 - 1, -(2**31)]))


@st.composite
def serving_requests(draw: st.DrawFn, method: Method, job_ids: list[str], real: list[bytes]) -> Any:
    """Random values in every field, then, often, the served model's real name, versions and jobs."""
    request = draw(messages(method.request))
    fields = method.request.DESCRIPTOR.fields_by_name
    for name_field in ("name", "model"):
        if name_field in fields and draw(st.integers(0, 3)):
            setattr(request, name_field, MODEL)
    if "version" in fields:  # mostly a real one ("" is the default), so that many reach TorchServe
        request.version = draw(st.sampled_from(["", "1", "2"]) if draw(st.integers(0, 3)) else ODD_VERSIONS)
    if "job_id" in fields and draw(st.booleans()):
        request.job_id = draw(st.sampled_from(job_ids))
    if "images" in fields and draw(st.integers(0, 3)):
        del request.images[:]
        request.images.extend(draw(st.lists(image_payloads(real), min_size=1, max_size=4)))
    if "top_k" in fields and draw(st.booleans()):
        request.top_k = draw(TOP_K)
    return request


def _removes_version_1(method: Method, request: Any) -> bool:
    return method.name == "UnserveModel" and request.name == MODEL and request.version in ("", "1")


def call(channel: grpc.Channel, method: Method, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Send `payload` as the request bytes (no client-side serialization); the status and its details."""
    try:
        channel.unary_unary(method.path)(payload, metadata=AUTH, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# ---------------------------------------------------------------------- afterwards


@functools.cache
def _classifier(checkpoint: Path) -> ImageClassifier:
    return ImageClassifier.from_checkpoint(torch.load(checkpoint, weights_only=True))


def assert_still_serving(channel: grpc.Channel, checkpoints: dict[str, Path], images: list[bytes]) -> None:
    """`pets` is listed and ready, and every version it serves answers like its checkpoint in-process."""
    client = pb_grpc.FineTuningStub(channel)
    (listed,) = client.ListServedModels(pb.ListServedModelsRequest(), metadata=AUTH, timeout=30).models
    assert listed.name == MODEL and "1" in listed.versions and listed.ready
    inference = pb_grpc.InferenceStub(channel)
    for version in [*listed.versions, ""]:  # "" is the default version
        answer = inference.Predict(
            pb.PredictRequest(model=MODEL, version=version, images=images, top_k=2),
            metadata=AUTH,
            timeout=120,
        )
        checkpoint = checkpoints[version or listed.version]
        expected = [_classifier(checkpoint).handle([{"data": i, "top_k": 2}])[0] for i in images]
        for got, want in zip(answer.predictions, expected, strict=True):
            assert isinstance(want, list) and not got.error, got.error
            assert [s.label for s in got.scores] == [s["label"] for s in want], version
            assert [s.probability for s in got.scores] == pytest.approx(
                [s["probability"] for s in want], abs=1e-4
            )
    health = health_pb2_grpc.HealthStub(channel)

    def model_serving() -> bool:
        request = health_pb2.HealthCheckRequest(service=f"torchserve/{MODEL}")
        return health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING

    wait_for(model_serving, timeout=60, what=f"torchserve/{MODEL} to be SERVING")


def brief(request: Any) -> str:
    """The request for a failure message, each image shown by its size and first bytes."""
    shown = type(request)()
    shown.CopyFrom(request)
    fields = " ".join(str(shown).split())
    if "images" in shown.DESCRIPTOR.fields_by_name:
        images = [(len(image), image[:8]) for image in shown.images]
        del shown.images[:]
        fields = " ".join(str(shown).split()) + f" images (size, first bytes): {images}"
    return f"{type(request).__name__}({fields})"


def summary(codes: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in codes.most_common())


# ---------------------------------------------------------------------- properties


def test_serving_requests_to_a_served_model_get_only_client_errors(
    channel: grpc.Channel, served: dict[str, Any], serving_images: list[bytes]
) -> None:
    codes: Counter[str] = Counter()
    reached: Counter[str] = Counter()  # Predict answers from TorchServe: scores or a per-image error

    @settings(FUZZ, max_examples=1000)
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(METHODS), label="method")
        request = data.draw(serving_requests(method, served["job_ids"], serving_images), label="request")
        assume(not _removes_version_1(method, request))
        code, details = call(channel, method, request.SerializeToString())
        assert code in CLIENT_ERRORS, f"{method.path} answered {code.name} ({details}) to {brief(request)}"
        codes[code.name] += 1
        if method.name == "Predict" and code == grpc.StatusCode.OK:
            reached[method.name] += 1

    case()
    assert reached["Predict"] > 0  # the fuzzing got past the lookups, to TorchServe and the handler
    assert_still_serving(channel, served["checkpoints"], serving_images)
    record(
        "request",
        f"the serving RPCs ({', '.join(SERVING_RPCS)}) with a model served by the real TorchServe: "
        "random fields, leaning to its real name, versions and job; broken and bomb images; any top_k",
        codes.total(),
        f"only client errors or OK ({summary(codes)}; {reached.total()} predictions answered by TorchServe); "
        "never INTERNAL/UNKNOWN/UNAVAILABLE; every version still answers like its checkpoint",
    )


def test_random_bytes_to_the_serving_rpcs_get_only_client_errors(
    channel: grpc.Channel, served: dict[str, Any], serving_images: list[bytes]
) -> None:
    codes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(method=st.sampled_from(METHODS), payload=st.binary(max_size=512))
    def case(method: Method, payload: bytes) -> None:
        try:
            request = method.request.FromString(payload)
        except DecodeError:  # not a valid message: the server must say so
            request = None
        assume(request is None or not _removes_version_1(method, request))
        code, details = call(channel, method, payload)
        assert code in CLIENT_ERRORS, f"{method.path} answered {code.name} ({details}) to {payload[:200]!r}"
        codes[code.name] += 1

    case()
    assert_still_serving(channel, served["checkpoints"], serving_images)
    record(
        "request",
        "the serving RPCs, with a model served by the real TorchServe, given random bytes as the request",
        codes.total(),
        f"only client errors or OK ({summary(codes)}); never INTERNAL; every version still answers like "
        "its checkpoint",
    )


def test_every_serving_rpc_is_fuzzed() -> None:
    """A renamed or new serving RPC must not silently drop out of the fuzzing above."""
    assert {m.name for m in METHODS} == set(SERVING_RPCS)
    assert all(not m.server_streaming for m in METHODS)  # call() sends unary requests only
