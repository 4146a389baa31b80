"""Who may do what, from outside the process: per-client tokens (a tokens file), the role each RPC needs,
jobs that belong to their creator, per-client limits, and a tokens file changed while the server runs.

One real server for the module, on loopback, with a tokens file of four clients and the shared
TUNESERVE_AUTH_TOKEN. Its scheduler is stopped after start-up, so created jobs stay QUEUED and counts
are exact; where a test needs a RUNNING job it moves it there through the job store, as the scheduler
would (named where it happens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cli_harness import cli_for
from fuzzing import Method, all_methods
from harness import make_image_folder, make_settings, running_service, spec
from reliability import record

from service.access.tokens_file import token_sha256
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.app import Service
from service.records import JobState

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

Code = grpc.StatusCode
SHARED = "shared-admin-token-0123456789"
TOKENS = {"reader": "tok-reader-1", "alice": "tok-alice-1", "bob": "tok-bob-1", "root": "tok-root-1"}
CLIENTS = [
    {"name": "reader", "roles": ["read"]},
    {"name": "alice", "roles": ["submit"], "max_queued": 2, "max_running": 1},
    {"name": "bob", "roles": ["submit"]},
    {"name": "root", "roles": ["admin"]},
]
METHODS = all_methods()
# The table this test holds the server to, written out here rather than read from service.access.policy:
# the RPCs each role may NOT call (PERMISSION_DENIED). Everything else must reach the RPC.
DENIED = {
    "read": {"CreateJob", "CancelJob", "ServeJob", "ExportModel", "UnserveModel", "SetDefaultVersion"},
    "submit": {"UnserveModel", "SetDefaultVersion"},
    "admin": set(),
}
AS_ROLE = {"read": "reader", "submit": "bob", "admin": "root"}


def tokens_json(clients: list[dict[str, Any]]) -> str:
    entries = [{**c, "token_sha256": token_sha256(TOKENS[c["name"]])} for c in clients]
    return json.dumps({"clients": entries})


def replace_file(path: Path, text: str) -> None:
    """Write beside, then rename over: a new inode, as an atomic deploy (or a Secret's symlink swap) gives."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "tokens.json"
    path.write_text(tokens_json(CLIENTS))
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tokens_file: Path) -> Iterator[Service]:
    settings = make_settings(
        tmp_path_factory.mktemp("auth"), auth_token=SHARED, auth_tokens_file=tokens_file, max_queued_jobs=50
    )
    make_image_folder(settings.data_root / "ds")
    with running_service(settings) as running:
        running.scheduler.stop(drain=False)
        yield running


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture(autouse=True)
def empty_queue(service: Service) -> Iterator[None]:
    yield
    for job in service.store.list_jobs([], 500)[0]:  # leave no live job to the next test
        if not job.state.is_final:
            service.store.transition(job.id, JobState.CANCELLED, "test cleanup")


def auth(name: str) -> tuple[tuple[str, str], ...]:
    token = SHARED if name == "shared" else TOKENS[name]
    return (("authorization", f"Bearer {token}"),)


class As:
    """The FineTuning stub of one client."""

    def __init__(self, channel: grpc.Channel, name: str) -> None:
        self.stub = pb_grpc.FineTuningStub(channel)
        self.metadata = auth(name)

    def create(self, name: str, key: str = "") -> pb.Job:
        request = pb.CreateJobRequest(spec=spec(name), idempotency_key=key)
        return self.stub.CreateJob(request, metadata=self.metadata, timeout=30)

    def get(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=30)

    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=self.metadata, timeout=30)

    def watch(self, job_id: str) -> list[pb.JobEvent]:
        request = pb.WatchJobRequest(job_id=job_id)
        return list(self.stub.WatchJob(request, metadata=self.metadata, timeout=5))

    def list_ids(self) -> set[str]:
        answer = self.stub.ListJobs(pb.ListJobsRequest(page_size=500), metadata=self.metadata, timeout=30)
        return {job.id for job in answer.jobs}


def failure(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def status_of(channel: grpc.Channel, method: Method, metadata: Any) -> Code:
    """The status of `method` called with an empty request (valid for every request type)."""
    try:
        if method.server_streaming:
            list(channel.unary_stream(method.path)(b"", metadata=metadata, timeout=30))
        else:
            channel.unary_unary(method.path)(b"", metadata=metadata, timeout=30)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return Code.OK


# ---------------------------------------------------------------------- each role x each RPC


def test_each_role_reaches_exactly_the_rpcs_of_its_row(channel: grpc.Channel) -> None:
    answers = {role: {m.name: status_of(channel, m, auth(AS_ROLE[role])) for m in METHODS} for role in DENIED}
    answers["shared token"] = {m.name: status_of(channel, m, auth("shared")) for m in METHODS}
    for role, answered in answers.items():
        denied = {name for name, code in answered.items() if code == Code.PERMISSION_DENIED}
        assert denied == DENIED.get(role, set()), (role, answered)
        assert Code.UNAUTHENTICATED not in answered.values(), (role, answered)
    for method in METHODS:
        outcome = "; ".join(
            f"{role}: {'PERMISSION_DENIED' if codes[method.name] == Code.PERMISSION_DENIED else 'reaches it'}"
            for role, codes in answers.items()
        )
        record("auth", f"{method.name} called as read, submit, admin and the shared token", 4, outcome)


def test_a_denied_call_names_the_client_its_roles_and_the_role_needed(channel: grpc.Channel) -> None:
    error = failure(As(channel, "reader").create, "not-mine")
    assert error.code() == Code.PERMISSION_DENIED
    assert error.details() == (
        "client reader has roles read; CreateJob needs submit (ask for it to be added in the tokens file)"
    )
    assert As(channel, "root").list_ids() == set()  # nothing was created
    record(
        "auth",
        "CreateJob by a read-only client",
        1,
        "PERMISSION_DENIED naming the client, roles and role needed; nothing created",
    )


def test_an_unknown_token_is_unauthenticated(channel: grpc.Channel) -> None:
    metadata = (("authorization", "Bearer tok-mallory"),)
    answered = {m.name: status_of(channel, m, metadata) for m in METHODS}
    assert set(answered.values()) == {Code.UNAUTHENTICATED}
    record("auth", f"every RPC ({len(METHODS)}) with a token no client has", len(METHODS), "UNAUTHENTICATED")


# ---------------------------------------------------------------------- a job belongs to its creator


def test_another_clients_job_is_not_found_in_the_words_of_a_job_that_does_not_exist(
    channel: grpc.Channel,
) -> None:
    alice, bob, reader = As(channel, "alice"), As(channel, "bob"), As(channel, "reader")
    job = alice.create("alices")
    ghost = "job-000000000000"
    for call in (bob.get, bob.cancel, bob.watch, reader.get, reader.watch):  # a reader may not cancel
        theirs, nobodys = failure(call, job.id), failure(call, ghost)
        assert theirs.code() == nobodys.code() == Code.NOT_FOUND
        assert theirs.details().replace(job.id, ghost) == nobodys.details()
    assert alice.get(job.id).state == pb.QUEUED  # bob's cancel did nothing
    record(
        "auth",
        "GetJob, CancelJob, WatchJob on another client's job (a submit client; a read client: Get, Watch)",
        5,
        "NOT_FOUND with the same message as a job that does not exist; the job untouched",
    )


def test_list_shows_a_client_its_own_jobs_and_an_admin_everyones(
    service: Service, channel: grpc.Channel
) -> None:
    alice, bob = As(channel, "alice"), As(channel, "bob")
    mine, theirs = alice.create("a1").id, bob.create("b1").id
    listed = {name: As(channel, name).list_ids() for name in ("alice", "bob", "reader", "root", "shared")}
    assert mine in listed["alice"] and theirs in listed["bob"]
    assert {service.store.get_job(i).owner for i in listed["alice"]} == {"alice"}
    assert {service.store.get_job(i).owner for i in listed["bob"]} == {"bob"}
    assert listed["reader"] == set()
    everyone = {job.id for job in service.store.list_jobs([], 500)[0]}
    assert listed["root"] == listed["shared"] == everyone
    record(
        "auth",
        "ListJobs by each client",
        5,
        "a client lists its own jobs only; admins (and the shared token) all",
    )


def test_an_admin_reads_watches_and_cancels_anyones_job(channel: grpc.Channel) -> None:
    job = As(channel, "bob").create("bobs")
    root = As(channel, "root")
    assert root.get(job.id).owner == "bob"
    assert root.cancel(job.id).state == pb.CANCELLED
    assert [e.seq for e in root.watch(job.id)][:1] == [1]  # a final job's stream ends by itself
    assert As(channel, "bob").get(job.id).state == pb.CANCELLED
    record("auth", "GetJob, CancelJob, WatchJob by an admin on another client's job", 3, "allowed")


def test_a_submitter_cancels_its_own_job(channel: grpc.Channel) -> None:
    alice = As(channel, "alice")
    job = alice.create("own")
    assert alice.cancel(job.id).state == pb.CANCELLED
    record("auth", "CancelJob by a submit client on its own job", 1, "CANCELLED")


def test_another_clients_idempotency_key_does_not_return_their_job(channel: grpc.Channel) -> None:
    job = As(channel, "alice").create("keyed", key="shared-key-1")
    error = failure(As(channel, "bob").create, "keyed", "shared-key-1")
    assert error.code() == Code.ALREADY_EXISTS and job.id not in error.details()
    assert As(channel, "alice").create("keyed", key="shared-key-1").id == job.id  # still hers to repeat
    record(
        "auth",
        "CreateJob reusing another client's idempotency key",
        1,
        "ALREADY_EXISTS without the other job's id; the owner still gets its job back",
    )


def test_serving_rpcs_answer_everyone_alike_when_serving_is_off(channel: grpc.Channel) -> None:
    """No TorchServe here: serving on another client's job must not tell more than serving on one's own."""
    job = As(channel, "alice").create("served")
    for who in ("alice", "bob"):
        stub, metadata = As(channel, who).stub, auth(who)
        serve = failure(stub.ServeJob, pb.ServeJobRequest(job_id=job.id), metadata=metadata)
        export_request = pb.ExportModelRequest(job_id=job.id, target_dir="/tmp/x")
        export = failure(stub.ExportModel, export_request, metadata=metadata)
        for error in (serve, export):
            assert error.code() == Code.FAILED_PRECONDITION and "serving is disabled" in error.details()


# ---------------------------------------------------------------------- per-client limits


def test_a_client_past_its_queued_limit_is_resource_exhausted_with_the_numbers(
    channel: grpc.Channel,
) -> None:
    alice, bob = As(channel, "alice"), As(channel, "bob")
    first = alice.create("q1")
    alice.create("q2")
    error = failure(alice.create, "q3")
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert error.details().startswith("client alice has 2 queued jobs; its limit is 2 (max_queued")
    bob.create("b-unlimited")  # another client's room is its own
    alice.cancel(first.id)
    alice.create("q3")
    record(
        "auth",
        "CreateJob past a client's max_queued (2)",
        1,
        "RESOURCE_EXHAUSTED: 'client alice has 2 queued jobs; its limit is 2'; other clients unaffected; "
        "room again after a cancel",
    )


def test_a_client_past_its_running_limit_is_resource_exhausted_with_the_numbers(
    service: Service, channel: grpc.Channel
) -> None:
    alice = As(channel, "alice")
    job = alice.create("r1")
    service.store.transition(job.id, JobState.RUNNING)  # stand-in for the stopped scheduler starting it
    error = failure(alice.create, "r2")
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert error.details().startswith("client alice has 1 running jobs; its limit is 1 (max_running")
    record(
        "auth",
        "CreateJob past a client's max_running (1)",
        1,
        "RESOURCE_EXHAUSTED naming the count and the limit",
    )


# ---------------------------------------------------------------------- the CLI with a client's token


def test_the_cli_with_a_clients_token_lists_only_its_jobs(service: Service, channel: grpc.Channel) -> None:
    mine, theirs = As(channel, "alice").create("cli-a").id, As(channel, "bob").create("cli-b").id
    result = cli_for(service, TOKENS["alice"])("jobs")
    assert result.exit_code == 0, result.output
    assert mine in result.output and theirs not in result.output
    shown = cli_for(service, TOKENS["alice"])("show", theirs)
    assert shown.exit_code == 3 and "does not exist" in shown.stderr  # NOT_FOUND's exit code
    own = cli_for(service, TOKENS["alice"])("show", mine)
    assert own.exit_code == 0 and "owner" in own.output and "alice" in own.output
    by_admin = cli_for(service, TOKENS["root"])("show", theirs)
    assert by_admin.exit_code == 0 and "owner" in by_admin.output and "bob" in by_admin.output
    record(
        "auth",
        "`tuneserve jobs` / `show` with a client's token",
        2,
        "its own jobs only; another's is NOT_FOUND (exit 3)",
    )


# ---------------------------------------------------------------------- the file changes while serving


def test_a_changed_tokens_file_is_used_without_a_restart_and_a_bad_one_keeps_the_old(
    channel: grpc.Channel, tokens_file: Path
) -> None:
    original = tokens_file.read_text()
    TOKENS["dave"] = "tok-dave-1"
    try:
        without_bob = [c for c in CLIENTS if c["name"] != "bob"] + [{"name": "dave", "roles": ["read"]}]
        replace_file(tokens_file, tokens_json(without_bob))
        assert As(channel, "dave").list_ids() == set()
        assert failure(As(channel, "bob").list_ids).code() == Code.UNAUTHENTICATED
        replace_file(tokens_file, '{"clients": [')  # a broken deploy
        assert As(channel, "dave").list_ids() == set()  # the last good file still holds
        assert failure(As(channel, "bob").list_ids).code() == Code.UNAUTHENTICATED
    finally:
        replace_file(tokens_file, original)
        TOKENS.pop("dave")
    assert As(channel, "bob").list_ids() is not None
    record(
        "auth",
        "the tokens file replaced while serving (a client added, one removed), then by a broken file",
        2,
        "the new clients at the next call, no restart; the broken file logged and the last good one kept",
    )


@pytest.mark.slow
def test_a_bad_tokens_file_at_start_stops_the_service_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.json"
    bad.write_text(
        json.dumps({"clients": [{"name": "x", "token_sha256": "not-a-digest", "roles": ["read"]}]})
    )
    env = {
        **os.environ,
        "TUNESERVE_AUTH_TOKENS_FILE": str(bad),
        "TUNESERVE_STATE_DIR": str(tmp_path / "state"),
        "TUNESERVE_PORT": "0",
        "TUNESERVE_TORCHSERVE_ENABLED": "false",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4, done.stderr  # FAILED_PRECONDITION's exit code
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    prefix = f"error: FAILED_PRECONDITION: tokens file {bad}: client 'x': a token_sha256 is not a SHA-256"
    assert line.startswith(prefix), line
    assert "not-a-digest" not in done.stderr  # it might have been a token
    assert "Traceback" not in done.stderr
    record(
        "auth",
        "`tuneserve serve` with a malformed tokens file",
        1,
        "exit 4 with one line naming the file, the client and the field (not its value)",
    )
