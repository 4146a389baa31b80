"""The `tuneserve` CLI against a real in-process service on loopback: output and exit code of each command.

This service runs without TorchServe, so it starts in seconds; the serving commands (predict, served,
serve-job, set-default, unserve) run against a real TorchServe in test_cli_serving.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cli_harness import Cli, assert_error_line, cli_for
from harness import make_image_folder, make_settings, running_service
from typer.testing import Result

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.api.health import HealthReporter
from service.app import Service
from service.cli.client import Client, ClientConfig
from service.cli.watch import Backoff, follow_events
from tests.ports import free_ports

TOKEN = "cli-test-token"
REPO = Path(__file__).resolve().parents[2]
TINY_SPEC = """\
name: tiny-cli
model: {architecture: mobilenet_v3_small, weights: none}
data: {path: ds, val_fraction: 0.25}
training: {epochs: 1, batch_size: 4, image_size: 32, augmentation: none, device: cpu}
early_stopping: {enabled: false}
logging: {tensorboard: true, wandb: {mode: disabled}}
serving: {enabled: false}
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("cli")
    make_image_folder(root / "data" / "ds", classes=2, per_class=4)
    with running_service(make_settings(root, auth_token=TOKEN)) as running:
        yield running


@pytest.fixture(scope="module")
def cli(service: Service) -> Cli:
    return cli_for(service, TOKEN)


# ------------------------------------------------------------------------------------------ errors


def test_unknown_job_is_one_not_found_line_and_exit_3(cli: Cli) -> None:
    assert_error_line(cli("show", "job-nope"), 3, "NOT_FOUND", "job-nope")


def test_cancel_unknown_job_is_not_found(cli: Cli) -> None:
    assert_error_line(cli("cancel", "job-nope"), 3, "NOT_FOUND")


def test_wrong_token_is_unauthenticated_and_exit_5(cli: Cli) -> None:
    assert_error_line(cli("jobs", token="wrong"), 5, "UNAUTHENTICATED", "token")


def test_unreachable_server_is_unavailable_and_exit_6(cli: Cli) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    assert_error_line(cli("--timeout", "3", "jobs", address=closed), 6, "UNAVAILABLE", "--address")


def test_spec_with_unknown_field_names_it_and_lists_the_allowed(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_SPEC.replace("epochs: 1", "epochz: 1"))
    assert_error_line(cli("submit", str(path)), 2, "INVALID_ARGUMENT", "spec.training.epochz", "epochs")


def test_spec_with_bad_value_is_the_servers_invalid_argument(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "model": {"architecture": "resnet18"}, "data": {"path": "ds"},
                                "training": {"lr": -1}}))  # fmt: skip
    assert_error_line(cli("submit", str(path)), 2, "INVALID_ARGUMENT", "spec.training.lr", "-1")


def test_spec_file_that_is_not_a_mapping_is_refused(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    assert_error_line(cli("submit", str(path)), 2, "INVALID_ARGUMENT", "mapping")


def test_unknown_state_filter_lists_the_states(cli: Cli) -> None:
    assert_error_line(cli("jobs", "--state", "done"), 2, "INVALID_ARGUMENT", "SUCCEEDED")


def test_out_of_range_freeze_depth_is_invalid_argument(cli: Cli) -> None:
    assert_error_line(
        cli("describe", "resnet18", "--freeze-depth", "99"), 2, "INVALID_ARGUMENT", "freeze.depth"
    )


# ---------------------------------------------------------------------------------- models, describe


def test_health_reports_each_service_and_inference_off_without_torchserve(cli: Cli) -> None:
    result = cli("health")
    assert result.exit_code == 0, result.output
    statuses = dict(line.split() for line in result.stdout.splitlines())
    assert statuses == {
        "(server)": "SERVING",
        "tuneserve.v1.FineTuning": "SERVING",
        "tuneserve.v1.Inference": "NOT_SERVING",
    }


def test_health_lists_every_published_name_and_drops_a_model_no_longer_served(tmp_path: Path) -> None:
    readiness = {"torchserve": True, "torchserve/pets": False, "torchserve/a-rather-long-model-name": True}
    with running_service(make_settings(tmp_path, auth_token=TOKEN)) as service:
        reporter = HealthReporter(lambda: readiness, service.server.set_serving)  # as TorchServe's probe
        reporter.report_once()
        listed = cli_for(service, TOKEN)("health")
        del readiness["torchserve/pets"]
        reporter.report_once()
        after = cli_for(service, TOKEN)("health")
    assert listed.exit_code == 0, listed.output
    assert dict(line.split() for line in listed.stdout.splitlines()) == {
        "(server)": "SERVING",
        "torchserve": "SERVING",
        "torchserve/a-rather-long-model-name": "SERVING",
        "torchserve/pets": "NOT_SERVING",
        "tuneserve.v1.FineTuning": "SERVING",
        "tuneserve.v1.Inference": "NOT_SERVING",
    }
    assert "torchserve/pets" not in after.stdout and "torchserve/a-rather-long-model-name" in after.stdout


def test_models_lists_the_builtin_lite0(cli: Cli) -> None:
    result = cli("models", "--source", "builtin")
    assert result.exit_code == 0, result.output
    assert "tf_efficientnet_lite0" in result.stdout and "builtin" in result.stdout


def test_describe_marks_the_frozen_rows_and_totals_them(cli: Cli) -> None:
    result = cli("describe", "resnet18", "--freeze-depth", "5", "--image-size", "64", "--num-classes", "3")
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line.split() for line in result.stdout.splitlines() if line.split()[:1] != []
            and line.split()[0].isdigit()}  # fmt: skip
    assert [name for name, row in rows.items() if row[-1] == "frozen"] == [
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1",
    ]
    assert rows["layer2"][-1] == "trainable" and rows["fc"][-1] == "head"
    assert rows["fc"][3] == "1x3"  # output shape for --num-classes 3
    assert "frozen 157,504" in result.stdout  # conv1 9,408 + bn1 128 + layer1 147,968
    assert "freeze depths 0..9" in result.stdout


# ------------------------------------------------------------------------------------- a real job


@pytest.fixture(scope="module")
def watched_job(cli: Cli, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, str]:
    """`submit SPEC --watch` of a job that trains for seconds; (its result, the job id)."""
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(TINY_SPEC)
    result = cli("submit", str(path), "--watch")
    job_id = result.stdout.split()[2]
    return result, job_id


@pytest.mark.slow
def test_submit_watch_follows_the_job_to_a_summary(watched_job: tuple[Result, str]) -> None:
    result, job_id = watched_job
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"submitted job {job_id} (tiny-cli, QUEUED)")
    for expected in ("QUEUED -> RUNNING", "EPOCH", "epoch 1/1", "CHECKPOINT", "RUNNING -> PACKAGING"):
        assert expected in result.stdout
    summary = result.stdout[result.stdout.index(f"job {job_id}: SUCCEEDED") :]
    for row in ("best epoch", "best val_loss", "val_accuracy", "checkpoint", "tensorboard", "archive"):
        assert row in summary


@pytest.mark.slow
def test_jobs_table_shows_the_job(cli: Cli, watched_job: tuple[Result, str]) -> None:
    result = cli("jobs", "--state", "succeeded")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if watched_job[1] in line)
    assert "tiny-cli" in line and "SUCCEEDED" in line and "mobilenet_v3_small" in line and "1/1" in line


@pytest.mark.slow
def test_show_json_is_the_job_with_its_result_paths(cli: Cli, watched_job: tuple[Result, str]) -> None:
    result = cli("show", watched_job[1], "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["state"] == "SUCCEEDED" and job["spec"]["name"] == "tiny-cli"
    assert Path(job["result"]["best_checkpoint"]).is_file()


@pytest.mark.slow
def test_show_says_how_many_validation_images_the_gate_compares_on(
    cli: Cli, watched_job: tuple[Result, str]
) -> None:
    sample = json.loads(cli("show", watched_job[1], "--json").stdout)["result"]["gate_sample"]
    assert len(sample) >= 2 and all(not Path(p).is_absolute() for p in sample)
    shown = cli("show", watched_job[1])
    assert shown.exit_code == 0 and f"{len(sample)} validation images" in shown.stdout


@pytest.mark.slow
def test_watch_of_a_finished_job_replays_it_and_exits_0(cli: Cli, watched_job: tuple[Result, str]) -> None:
    result = cli("watch", watched_job[1])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.stdout and f"job {watched_job[1]}: SUCCEEDED" in result.stdout


@pytest.mark.slow
def test_cancelled_job_watch_exits_9_and_key_returns_the_same_job(
    cli: Cli, watched_job: tuple[Result, str], tmp_path: Path
) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPEC)
    first = cli("submit", str(path), "--idempotency-key", "k-1", "--quiet", "--set", "training.epochs=50")
    again = cli("submit", str(path), "--idempotency-key", "k-1", "--quiet", "--set", "training.epochs=50")
    assert first.exit_code == again.exit_code == 0, first.output + again.output
    job_id = first.stdout.strip()
    assert again.stdout.strip() == job_id
    cancelled = cli("cancel", job_id)
    assert cancelled.exit_code == 0 and job_id in cancelled.stdout
    watched = cli("watch", job_id)
    assert watched.exit_code == 9, watched.output
    assert f"job {job_id}: CANCELLED" in watched.stdout


# ------------------------------------------------------------------------- serving, when it is off


def test_predict_missing_image_names_it(cli: Cli, tmp_path: Path) -> None:
    assert_error_line(cli("predict", "pets", str(tmp_path / "nope.png")), 2, "INVALID_ARGUMENT", "nope.png")


@pytest.mark.parametrize(
    "args", [("served",), ("set-default", "pets", "1"), ("unserve", "pets"), ("serve-job", "job-x")]
)
def test_serving_commands_without_torchserve_say_how_to_enable_it(cli: Cli, args: tuple[str, ...]) -> None:
    assert_error_line(cli(*args), 4, "FAILED_PRECONDITION", "TUNESERVE_TORCHSERVE_ENABLED")


# ------------------------------------------------------------------------------- watch reconnects


class DroppingWatch(pb_grpc.FineTuningServicer):
    """Streams events 1-2, then drops the stream (UNAVAILABLE); the next call resumes from after_seq."""

    def __init__(self) -> None:
        self.after_seqs: list[int] = []

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        self.after_seqs.append(request.after_seq)
        for seq in range(request.after_seq + 1, 5):
            yield pb.JobEvent(job_id=request.job_id, seq=seq, kind="INFO", message=f"event {seq}")
            if len(self.after_seqs) == 1 and seq == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "server restarting")

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return pb.Job(id=request.job_id, state=pb.SUCCEEDED)


def test_watch_resumes_after_the_last_seen_event_when_the_stream_drops() -> None:
    servicer = DroppingWatch()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FineTuningServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    retries: list[int] = []
    try:
        with Client(ClientConfig(address=f"127.0.0.1:{port}")) as client:
            events = follow_events(
                client,
                "job-x",
                on_retry=lambda _d, _w, seq: retries.append(seq),
                backoff=Backoff(initial_s=0.01),
            )
            seqs = [event.seq for event in events]
    finally:
        server.stop(None)
    assert seqs == [1, 2, 3, 4]
    assert servicer.after_seqs == [0, 2] and retries == [2]


# ------------------------------------------------------------- local processes: serve, tensorboard


def tuneserve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "service.cli.main", *args]
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_with_a_bad_setting_names_the_variable_and_exits_2(tmp_path: Path) -> None:
    process = tuneserve("serve", env={"TUNESERVE_PORT": "not-a-port", "TUNESERVE_STATE_DIR": str(tmp_path)})
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert output.strip().splitlines()[-1].startswith("error: INVALID_ARGUMENT: TUNESERVE_PORT")


def test_serve_refuses_a_named_replica_on_the_sqlite_file_before_creating_anything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {
        "TUNESERVE_REPLICA_ID": "tuneserve-7d9f-abcde",
        "TUNESERVE_DATABASE_URL": "",
        "TUNESERVE_STATE_DIR": str(state),
    }
    process = tuneserve("serve", env=env)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 4, output  # FAILED_PRECONDITION
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: FAILED_PRECONDITION: TUNESERVE_REPLICA_ID='tuneserve-7d9f-abcde'"), output
    assert str(state / "jobs.sqlite3") in last and "TUNESERVE_DATABASE_URL" in last
    assert not state.exists()  # no database file, no TorchServe, no port


@pytest.mark.slow
def test_serve_runs_in_the_foreground_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    env = {
        "TUNESERVE_STATE_DIR": str(tmp_path / "state"),
        "TUNESERVE_DATA_ROOT": str(tmp_path),
        "TUNESERVE_TORCHSERVE_ENABLED": "false",
        "TUNESERVE_AUTH_TOKEN": TOKEN,
    }
    process = tuneserve("serve", "--port", str(port), env=env)
    try:
        with Client(ClientConfig(address=f"127.0.0.1:{port}", token=TOKEN)) as client:
            client.wait_until_serving(120)
            assert client.call(client.jobs.ListJobs, pb.ListJobsRequest()).jobs == []
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert f"tuneserve is serving on 127.0.0.1:{port}" in output and "Traceback" not in output


@pytest.mark.slow
def test_tensorboard_serves_the_job_logs_and_stops_with_the_cli(
    service: Service, watched_job: tuple[Result, str]
) -> None:
    port = free_ports(1)[0]
    process = tuneserve(
        "--address", f"127.0.0.1:{service.port}", "--token", TOKEN, "tensorboard", watched_job[1],
        "--port", str(port),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("TensorBoard did not answer within 120 s")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert f"TensorBoard for job {watched_job[1]}" in output and url in output
    with pytest.raises(OSError):  # TensorBoard went with the CLI
        urllib.request.urlopen(url, timeout=2)


def _shown_in_docker_readme() -> list[str]:
    """The tensorboard command docker/README.md tells a user to `docker exec` in the container."""
    text = (REPO / "docker" / "README.md").read_text()
    (command,) = re.findall(r"`docker exec -it <container> (tuneserve tensorboard [^`]*)`", text)
    return shlex.split(command)


def _image_env(name: str) -> str:
    """A variable the Dockerfile's ENV sets: what a `docker exec` shell in the image sees."""
    (value,) = re.findall(rf"\b{name}=(\S+)", (REPO / "docker" / "Dockerfile").read_text())
    return value


def _listening_on(port: int) -> set[str]:
    """Local IPv4 addresses a socket listens on at `port` (from /proc/net/tcp, state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.slow
def test_the_tensorboard_command_docker_readme_shows_works_as_shown(
    service: Service, watched_job: tuple[Result, str]
) -> None:
    shown = _shown_in_docker_readme()
    assert shown[:3] == ["tuneserve", "tensorboard", "JOB"]
    host = _image_env("TUNESERVE_TENSORBOARD_HOST")
    assert host == "0.0.0.0"
    env = {  # what `docker exec` sees in the container: the image's ENV and the service's address/token
        "TUNESERVE_TENSORBOARD_HOST": host,
        "TUNESERVE_ADDRESS": f"127.0.0.1:{service.port}",
        "TUNESERVE_AUTH_TOKEN": TOKEN,
    }
    args = [watched_job[1] if a == "JOB" else a for a in shown[1:]]
    executable = Path(sys.executable).with_name("tuneserve")
    process = subprocess.Popen(
        [str(executable), *args], env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until = time.monotonic() + 120
        while "0.0.0.0" not in _listening_on(6006):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < wait_until, "TensorBoard did not listen on 0.0.0.0:6006 within 120 s"
            time.sleep(0.5)
        with urllib.request.urlopen("http://127.0.0.1:6006/", timeout=10) as response:
            assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert f"TensorBoard for job {watched_job[1]}" in output and "http://0.0.0.0:6006/" in output
