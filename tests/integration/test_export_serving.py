"""The exported folder, served the way KServe's runtime serves it, where tuneserve is not installed.

A fresh virtualenv reuses the installed third-party packages (torch, torchvision, timm, TorchServe)
through a .pth line naming the dev venv's site-packages: a .pth line only adds a path, so the
site-packages' own .pth files, among them tuneserve's editable finder, are not run, and `import
service` / `import handlers` fail there (asserted). In it, exactly KServe's command,
`torchserve --start --model-store <dir>/model-store --ts-config <dir>/config/config.properties`,
serves the archive; its answers over REST and gRPC equal the checkpoint's in this process, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from handlers.inference import ImageClassifier
from service.packaging.archiver import build_archive
from service.packaging.export import export_archive
from service.serving_types import ExportRequest

pytestmark = [
    pytest.mark.torchserve,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
    pytest.mark.timeout(600),
]

PROBE = """
import importlib, json
found = {}
for name in ("torch", "torchvision", "timm", "ts", "service", "handlers"):
    try:
        importlib.import_module(name)
        found[name] = True
    except ImportError:
        found[name] = False
print(json.dumps(found))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def plain_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with the third-party packages and TorchServe's `torchserve` command, without tuneserve."""
    venv = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # type: ignore[attr-defined]
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([venv / "bin" / "python", "-c", where], text=True).strip())
    (site / "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    torchserve = venv / "bin" / "torchserve"  # what installing TorchServe there would write
    torchserve.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n"
    )
    torchserve.chmod(0o755)
    return venv


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment a container would give: no PYTHONPATH, the plain venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return {**env, **extra}


def test_the_plain_environment_has_the_libraries_but_not_tuneserve(plain_env: Path, tmp_path: Path):
    done = subprocess.run(
        [plain_env / "bin" / "python", "-c", PROBE], cwd=tmp_path, env=clean_env(plain_env),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout) == {
        "torch": True, "torchvision": True, "timm": True, "ts": True, "service": False, "handlers": False,
    }  # fmt: skip


@pytest.fixture(scope="module")
def exported(serving_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    archive = build_archive(serving_checkpoint, root / "store", "pets", "3")
    export_archive(archive, ExportRequest(job_id="job-1", target=root / "out"))
    return root / "out"


@pytest.fixture(scope="module")
def plain_torchserve(
    plain_env: Path, exported: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    run = tmp_path_factory.mktemp("run")  # the working directory: logs/, key_file.json
    (run / "tmp").mkdir()
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc", "grpc_management")}
    # enable_envvars_config=true in the exported config: TS_* move the ports off KServe's fixed ones,
    # which another TorchServe on this shared machine may hold
    env = clean_env(
        plain_env,
        TEMP=str(run / "tmp"), TMPDIR=str(run / "tmp"),
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{ports['inference']}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{ports['management']}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{ports['metrics']}",
        TS_GRPC_INFERENCE_PORT=str(ports["grpc"]),
        TS_GRPC_MANAGEMENT_PORT=str(ports["grpc_management"]),
        TS_VMARGS="-Xmx512m -XX:+UseSerialGC",
    )  # fmt: skip
    command = [
        "torchserve", "--start",
        "--model-store", str(exported / "model-store"),
        "--ts-config", str(exported / "config" / "config.properties"),
    ]  # fmt: skip
    with open(run / "start.log", "wb") as log:  # not a pipe: the JVM it leaves running would hold it open
        subprocess.run(
            command, cwd=run, env=env, check=True, timeout=120, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{ports['inference']}"
        deadline = time.monotonic() + 240
        while True:  # /ping is Healthy once the snapshot's model has a ready worker; it needs the key too
            try:
                key = json.loads((run / "key_file.json").read_text())["inference"]["key"]
                ping = urllib.request.Request(f"{url}/ping", headers={"Authorization": f"Bearer {key}"})
                with urllib.request.urlopen(ping, timeout=5) as answer:
                    if json.loads(answer.read()).get("status") == "Healthy":
                        break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-3000:] for p in (run / "logs").glob("*.log"))
                pytest.fail(f"plain TorchServe did not become healthy:\n{logs}")
            time.sleep(1)
        yield {"url": url, "ports": ports, "key": key, "run": run}
    finally:
        subprocess.run(
            ["torchserve", "--stop"], cwd=run, env=env, timeout=120, check=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _kill_leftover(run / "tmp" / ".model_server.pid")


def _kill_leftover(pid_file: Path) -> None:
    """If --stop did not stop the JVM this test started, kill it (by the pid it recorded)."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().split()[0]), 9)


def expected(serving_checkpoint: Path, images: list[bytes]) -> list[Any]:
    """The checkpoint's answers in this process, one image per batch as TorchServe got them here (a
    batch of another size rounds differently in the last bits)."""
    classifier = ImageClassifier.from_checkpoint(torch.load(serving_checkpoint, weights_only=True))
    return json.loads(json.dumps([classifier.handle([image])[0] for image in images]))


def test_rest_answers_equal_the_checkpoint_in_process(
    plain_torchserve: dict[str, Any], serving_checkpoint: Path, serving_images: list[bytes]
):
    answers = []
    for image in serving_images:
        request = urllib.request.Request(
            f"{plain_torchserve['url']}/predictions/pets",
            data=image,
            headers={
                "Authorization": f"Bearer {plain_torchserve['key']}",
                "Content-Type": "application/octet-stream",
            },
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            answers.append(json.loads(answer.read()))
    assert answers == expected(serving_checkpoint, serving_images)


def test_grpc_answers_equal_the_checkpoint_in_process(
    plain_torchserve: dict[str, Any], serving_checkpoint: Path, serving_images: list[bytes]
):
    from service.packaging.ts_gen import inference_pb2, inference_pb2_grpc

    metadata = [("authorization", f"Bearer {plain_torchserve['key']}")]
    with grpc.insecure_channel(f"127.0.0.1:{plain_torchserve['ports']['grpc']}") as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        answers = [
            json.loads(
                stub.Predictions(
                    inference_pb2.PredictionsRequest(model_name="pets", input={"data": image}),
                    metadata=metadata,
                    timeout=60,
                ).prediction
            )
            for image in serving_images
        ]
    assert answers == expected(serving_checkpoint, serving_images)


def test_inference_needs_the_token(plain_torchserve: dict[str, Any], serving_images: list[bytes]):
    request = urllib.request.Request(f"{plain_torchserve['url']}/predictions/pets", data=serving_images[0])
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    # TorchServe answers a missing key with 400 and says why
    assert refused.value.code == 400 and b"Token Authorization failed" in refused.value.read()


def test_the_version_and_the_handlers_code_come_from_the_export(plain_torchserve: dict[str, Any]):
    logs = (plain_torchserve["run"] / "logs" / "model_log.log").read_text()
    assert "loaded mobilenet_v3_small" in logs  # the handler's own log line, from the archive's code
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{plain_torchserve['ports']['metrics']}/metrics", timeout=30
    )
    assert b'model_name="pets"' in metrics.read()  # Prometheus format
