"""The exported folder, served the way KServe's runtime serves it, where tuneserve is not installed.

A fresh virtualenv reuses the installed third-party packages (torch, torchvision, timm, TorchServe)
through a .pth line naming the dev venv's site-packages (bench/plain_torchserve.py): tuneserve's editable
finder does not run there, and `import service` / `import handlers` fail (asserted). In it, exactly
KServe's command, `torchserve --start --model-store <dir>/model-store --ts-config
<dir>/config/config.properties`, serves the archive of a job trained on scikit-learn's digits; on that
job's validation images, as the promotion gate picks them, its answers over REST and gRPC equal the
checkpoint's in this process, bit for bit. The server is the session's one (tests/integration/conftest.py),
shared with test_export_readiness.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from export_proof import EXPORTED_MODEL, StartedServer, TrainedJob

from bench.plain_torchserve import clean_env
from handlers.inference import ImageClassifier

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


def test_the_plain_environment_has_the_libraries_but_not_tuneserve(plain_env: Path, tmp_path: Path):
    done = subprocess.run(
        [plain_env / "bin" / "python", "-c", PROBE], cwd=tmp_path, env=clean_env(plain_env),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout) == {
        "torch": True, "torchvision": True, "timm": True, "ts": True, "service": False, "handlers": False,
    }  # fmt: skip


def test_the_proof_runs_on_the_jobs_own_validation_images(digits_job: TrainedJob):
    assert digits_job.source == "validation images" and digits_job.warning == ""
    # the whole validation split (one picture of each digit), read back from the job's data
    assert len(digits_job.images) == 10
    assert {Path(name).parts[:1] for name in digits_job.image_names} == {("digits",)}
    assert {Path(name).parent.name for name in digits_job.image_names} == {str(d) for d in range(10)}


def expected(job: TrainedJob) -> list[Any]:
    """The checkpoint's answers in this process, one image per batch as TorchServe got them here (a
    batch of another size rounds differently in the last bits)."""
    classifier = ImageClassifier.from_checkpoint(torch.load(job.checkpoint, weights_only=True))
    return json.loads(json.dumps([classifier.handle([image])[0] for image in job.images]))


def test_rest_answers_equal_the_checkpoint_in_process(
    plain_torchserve: StartedServer, digits_job: TrainedJob
):
    server = plain_torchserve.server
    answers = []
    for image in digits_job.images:
        request = urllib.request.Request(
            f"{server.url}/predictions/{EXPORTED_MODEL}",
            data=image,
            headers={"Authorization": f"Bearer {server.key()}", "Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            answers.append(json.loads(answer.read()))
    assert answers == expected(digits_job)


def test_grpc_answers_equal_the_checkpoint_in_process(
    plain_torchserve: StartedServer, digits_job: TrainedJob
):
    from service.packaging.ts_gen import inference_pb2, inference_pb2_grpc

    server = plain_torchserve.server
    metadata = [("authorization", f"Bearer {server.key()}")]
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}") as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        answers = [
            json.loads(
                stub.Predictions(
                    inference_pb2.PredictionsRequest(model_name=EXPORTED_MODEL, input={"data": image}),
                    metadata=metadata,
                    timeout=60,
                ).prediction
            )
            for image in digits_job.images
        ]
    assert answers == expected(digits_job)


def test_inference_needs_the_token(plain_torchserve: StartedServer, digits_job: TrainedJob):
    url = f"{plain_torchserve.server.url}/predictions/{EXPORTED_MODEL}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, data=digits_job.images[0]), timeout=60)
    # TorchServe answers a missing key with 400 and says why
    assert refused.value.code == 400 and b"Token Authorization failed" in refused.value.read()


def test_the_version_and_the_handlers_code_come_from_the_export(plain_torchserve: StartedServer):
    server = plain_torchserve.server
    logs = (server.run / "logs" / "model_log.log").read_text()
    assert "loaded mobilenet_v3_small" in logs  # the handler's own log line, from the archive's code
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=30)
    assert f'model_name="{EXPORTED_MODEL}"'.encode() in metrics.read()  # Prometheus format
