"""Property-based fuzzing of every RPC against one real server: only client-error statuses, never INTERNAL.

One server (auth on) takes every case. Its scheduler is stopped after start-up, so the jobs that random
specs manage to create stay QUEUED and are cancelled: this fuzzes the API, and a training worker per
valid spec would swamp a small machine. After each property the server must still be healthy: health
answers (NOT_SERVING, truthfully, since the scheduler is stopped), and jobs can be read and created.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from fuzzing import CLIENT_ERRORS, Method, all_methods, messages, mutated, text
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import make_image_folder, make_settings, running_service, spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import record

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

TOKEN = "fuzz-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
METHODS = all_methods()
CALL_TIMEOUT_S = 30.0
FUZZ = settings(
    deadline=None,  # the machine is shared: a slow case is not a failure
    database=None,  # leave no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fuzz")
    config = make_settings(root, auth_token=TOKEN, max_queued_jobs=1_000_000, grpc_workers=8)
    make_image_folder(config.data_root / "ds")
    make_image_folder(root / "outside")
    (config.data_root / "labels.csv").write_text("ds/class_0/0.png,a;b\nds/class_1/0.png,b\n")
    with running_service(config) as running:
        running.scheduler.stop(drain=False)  # jobs stay QUEUED: see the module docstring
        assert running.jobs_health is not None
        running.jobs_health.report_once()  # health says so now, not at the next probe
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def known_job(channel: grpc.Channel) -> str:
    """A real (cancelled) job, so that job ids sometimes name one."""
    client = pb_grpc.FineTuningStub(channel)
    job = client.CreateJob(pb.CreateJobRequest(spec=spec("known")), metadata=AUTH)
    client.CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=AUTH)
    return job.id


def call_raw(channel: grpc.Channel, method: Method, payload: bytes, metadata: Any = AUTH) -> grpc.StatusCode:
    """Send `payload` as the request bytes (no client-side serialization) and return the status.

    A job that a random request managed to create is cancelled at once (no scheduler runs it), so that
    a later WatchJob of it ends.
    """
    try:
        if method.server_streaming:
            stream = channel.unary_stream(method.path)(payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
            for _ in stream:
                pass
        else:
            answer = channel.unary_unary(method.path)(payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
            if method.name == "CreateJob":
                cancel_queued(channel, pb.Job.FromString(answer))
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def cancel_queued(channel: grpc.Channel, job: pb.Job) -> None:
    if job.state == pb.QUEUED:
        pb_grpc.FineTuningStub(channel).CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=AUTH)


def assert_allowed(method: Method, code: grpc.StatusCode, what: Any) -> None:
    assert code in method.allowed, f"{method.path} answered {code.name} to {what!r}"


def assert_healthy(channel: grpc.Channel, job_id: str) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # the scheduler is stopped
    client = pb_grpc.FineTuningStub(channel)
    job = client.GetJob(pb.GetJobRequest(job_id=job_id), metadata=AUTH, timeout=10)
    assert job.id == job_id
    created = client.CreateJob(pb.CreateJobRequest(spec=spec("still-writable")), metadata=AUTH, timeout=10)
    cancel_queued(channel, created)


def summary(codes: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in codes.most_common())


def test_random_field_values_in_every_request_get_only_client_errors(
    channel: grpc.Channel, known_job: str
) -> None:
    codes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=1500)
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        method = data.draw(st.sampled_from(METHODS), label="method")
        request = data.draw(messages(method.request), label="request")
        if "job_id" in method.request.DESCRIPTOR.fields_by_name and data.draw(st.booleans()):
            request.job_id = known_job
        payload = request.SerializeToString()
        code = call_raw(channel, method, payload)
        assert_allowed(method, code, request)
        codes[code.name] += 1

    case()
    assert_healthy(channel, known_job)
    record(
        "request",
        f"every RPC ({len(METHODS)}) with random field values (unicode, huge and negative numbers, NaN, "
        "unknown enum numbers, path tricks)",
        codes.total(),
        f"only client errors or OK ({summary(codes)}); never INTERNAL/UNKNOWN; healthy afterwards",
    )


# Valid specs of each shape the spec allows, so that mutations reach the checks behind the first one.
SPEC_BASES = [
    spec("fuzzed"),
    spec("by-file", model={"weights": "file", "weights_file": "nope/w.pt"}),
    spec("labels", task="multilabel", data={"manifest": "labels.csv"}),
    spec("split", data={"val_path": "ds"}, freeze={"depth": 2}),
]


def test_job_specs_one_to_three_fields_from_valid_get_only_client_errors(
    channel: grpc.Channel, known_job: str
) -> None:
    codes: Counter[str] = Counter()
    create = next(m for m in METHODS if m.name == "CreateJob")

    @settings(FUZZ, max_examples=1200)
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        base = data.draw(st.sampled_from(SPEC_BASES), label="base")
        request = pb.CreateJobRequest(spec=data.draw(mutated(base), label="spec"))
        if data.draw(st.booleans()):
            request.idempotency_key = data.draw(text(), label="idempotency_key")
        code = call_raw(channel, create, request.SerializeToString())
        assert_allowed(create, code, request)
        codes[code.name] += 1

    case()
    assert_healthy(channel, known_job)
    record(
        "request",
        "CreateJob with a valid spec (4 shapes) whose 1-3 fields are set to random values",
        codes.total(),
        f"INVALID_ARGUMENT/FAILED_PRECONDITION naming the field, or a queued job ({summary(codes)}); "
        "never INTERNAL",
    )


def test_random_bytes_as_any_request_get_only_client_errors(channel: grpc.Channel, known_job: str) -> None:
    codes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=600)
    @given(method=st.sampled_from(METHODS), payload=st.binary(max_size=512))
    def case(method: Method, payload: bytes) -> None:
        code = call_raw(channel, method, payload)
        assert_allowed(method, code, payload)
        codes[code.name] += 1

    case()
    assert_healthy(channel, known_job)
    record(
        "request",
        "every RPC with random bytes as the request message (mostly not a valid protobuf)",
        codes.total(),
        f"INVALID_ARGUMENT naming the message type, or handled as parsed ({summary(codes)}); never INTERNAL",
    )


def test_another_requests_bytes_get_only_client_errors(channel: grpc.Channel, known_job: str) -> None:
    """Wrong types: a message of one request type sent to another RPC (fields of the wrong wire type)."""
    codes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=500)
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(METHODS), label="target")
        source = data.draw(st.sampled_from([m for m in METHODS if m.request is not target.request]))
        request = data.draw(messages(source.request), label="request")
        payload = request.SerializeToString()
        code = call_raw(channel, target, payload)
        assert_allowed(target, code, (source.request.DESCRIPTOR.name, request))
        codes[code.name] += 1

    case()
    assert_healthy(channel, known_job)
    record(
        "request",
        "every RPC with another RPC's request message (wrong field types on the wire)",
        codes.total(),
        f"client errors or OK ({summary(codes)}); never INTERNAL",
    )


def test_random_authorization_headers_are_unauthenticated(channel: grpc.Channel, known_job: str) -> None:
    codes: Counter[str] = Counter()
    # header values are visible ASCII (HTTP/2): grpc refuses to send anything else, client-side
    visible = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    header = st.one_of(
        visible.map(lambda s: f"Bearer {s}"),
        visible,
        st.sampled_from([f"bearer {TOKEN}x", f"Bearer  {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer"]),
    )

    @settings(FUZZ, max_examples=400)
    @given(method=st.sampled_from(METHODS), value=header)
    def case(method: Method, value: str) -> None:
        if value.strip().removeprefix("Bearer").strip() == TOKEN:
            return  # the right token, by chance
        code = call_raw(channel, method, b"", (("authorization", value.strip() or "x"),))
        assert code == grpc.StatusCode.UNAUTHENTICATED, f"{method.path} answered {code.name} to {value!r}"
        codes[code.name] += 1

    case()
    assert_healthy(channel, known_job)
    record(
        "security",
        "every RPC with a random or near-miss authorization header",
        codes.total(),
        "UNAUTHENTICATED every time",
    )


def test_the_statuses_fuzzing_allows_are_client_errors_only() -> None:
    """The allow-lists above never admit a server-fault status (a guard on the guard)."""
    faults = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
    assert not faults & CLIENT_ERRORS
    assert all(not faults & method.allowed for method in METHODS)
    assert {m.name for m in METHODS} >= {"CreateJob", "WatchJob", "Predict"}


FOUND = [
    # inputs that fuzzing turned up as INTERNAL, kept as regressions
    pytest.param(
        "ListJobs",
        pb.ListJobsRequest(page_token=base64.urlsafe_b64encode(b"v1:99999999999999999999").decode()),
        grpc.StatusCode.INVALID_ARGUMENT,
        id="a page token holding a number past SQLite's 64 bits",
    ),
    pytest.param(
        "CreateJob",
        pb.CreateJobRequest(spec=spec("long", data={"path": "a" * 5000})),
        grpc.StatusCode.INVALID_ARGUMENT,
        id="a dataset path longer than the OS allows",
    ),
    pytest.param(
        "CreateJob",
        pb.CreateJobRequest(spec=spec("nul", data={"path": "ds\x00/x"})),
        grpc.StatusCode.INVALID_ARGUMENT,
        id="a dataset path with a NUL character",
    ),
    pytest.param(
        "CreateJob",
        pb.CreateJobRequest(spec=spec("wf", model={"weights": "file", "weights_file": "w" * 5000})),
        grpc.StatusCode.FAILED_PRECONDITION,
        id="a weights file name longer than the OS allows",
    ),
    pytest.param(
        "GetJob", b"\x0a\x02\xff\xfe", grpc.StatusCode.INVALID_ARGUMENT, id="a string field of invalid UTF-8"
    ),
]


@pytest.mark.parametrize(("name", "request_", "code"), FOUND)
def test_an_input_fuzzing_found_gets_a_client_error(
    channel: grpc.Channel, name: str, request_: Any, code: grpc.StatusCode
) -> None:
    method = next(m for m in METHODS if m.name == name)
    payload = request_ if isinstance(request_, bytes) else request_.SerializeToString()
    assert call_raw(channel, method, payload) == code
