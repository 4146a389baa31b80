"""Package a job's best checkpoint as a TorchServe archive (.mar) in the model store.

The archive holds a state_dict (`model.pt`, read back with weights_only=True: never a pickled model),
`model_config.json`, `index_to_name.json`, our handler and the code it runs (handler_runtime.py, so
it serves without tuneserve installed). It is built in a private folder and linked into the store
under its final name, so TorchServe never sees half an archive and two packagers never replace each
other's. Which version to build is service.packaging.model_store's rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from handlers.inference import CONFIG_FILE, DEFAULT_MAX_IMAGE_PIXELS, LABELS_FILE, MODEL_FILE
from service.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from service.packaging.handler_runtime import stage_runtime
from service.packaging.mar_files import sha256_of
from service.serving_types import Archive
from service.spec import NAME_PATTERN
from service.training.checkpoints import load_checkpoint

VERSION_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
ARCHIVER_TIMEOUT_S = 300


def archive_file_name(model_name: str, version: str) -> str:
    return f"{model_name}-v{version}.mar"


def build_archive(
    checkpoint: Path,
    model_store: Path,
    model_name: str,
    version: str,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Archive:
    """Write `<model_name>-v<version>.mar` into model_store from a checkpoint; never replaces an archive."""
    _check_names(model_name, version)
    state = load_checkpoint(checkpoint)
    target = model_store / archive_file_name(model_name, version)
    if target.exists():
        raise AlreadyExists(
            f"archive {target} already exists; package under a new version, or delete it if it is not served"
        )
    model_store.mkdir(parents=True, exist_ok=True)
    # Staged inside the store so os.replace is a rename on one filesystem; TorchServe registers by
    # file name at the store's top level and never looks into this folder.
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=model_store) as staging:
        work = Path(staging)
        files = _write_payload(state, work / "payload", max_image_pixels)
        files["runtime"] = stage_runtime(work / "runtime")
        built = _run_archiver(files, model_name, version, work)
        try:  # a link, not os.replace: it fails, atomically, when another packager took the name first
            os.link(built, target)
        except FileExistsError:
            raise AlreadyExists(
                f"archive {target} appeared while packaging; package under a new version"
            ) from None
    return Archive(path=target, sha256=sha256_of(target), name=model_name, version=version)


def serving_config(state: dict[str, Any], max_image_pixels: int) -> dict[str, Any]:
    """model_config.json: the checkpoint's model_config plus the service's image-size limit."""
    return {**state["model_config"], "max_image_pixels": max_image_pixels}


def handler_file() -> Path:
    spec = find_spec("handlers.tuneserve_handler")
    if spec is None or spec.origin is None:
        raise FailedPrecondition("handlers/tuneserve_handler.py is not installed; run `make setup`")
    return Path(spec.origin)


def _check_names(model_name: str, version: str) -> None:
    if not re.match(NAME_PATTERN, model_name):
        raise InvalidArgument(
            f"model name {model_name!r} is not allowed: use letters, digits, '_' and '-' (up to 64, "
            "starting with a letter or digit)"
        )
    if not re.match(VERSION_PATTERN, version):
        raise InvalidArgument(f"version {version!r} is not allowed: use digits and dots, e.g. '3' or '1.2'")


def _write_payload(state: dict[str, Any], folder: Path, max_image_pixels: int) -> dict[str, Path]:
    folder.mkdir()
    class_names = list(state["class_names"])
    if list(state["model_config"]["class_names"]) != class_names:
        raise FailedPrecondition("the checkpoint's class_names and model_config.class_names differ; re-train")
    files = {"model": folder / MODEL_FILE, "config": folder / CONFIG_FILE, "labels": folder / LABELS_FILE}
    torch.save(state["model"], files["model"])
    files["config"].write_text(json.dumps(serving_config(state, max_image_pixels), indent=2, sort_keys=True))
    files["labels"].write_text(json.dumps({str(i): name for i, name in enumerate(class_names)}, indent=2))
    return files


def _run_archiver(files: dict[str, Path], model_name: str, version: str, work: Path) -> Path:
    """Run torch-model-archiver in a child process with a private $TMPDIR (it stages in $TMPDIR/<name>)."""
    export = work / "export"
    tmp = work / "tmp"
    export.mkdir()
    tmp.mkdir()
    command = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", model_name,
        "--version", version,
        "--handler", str(handler_file()),
        "--serialized-file", str(files["model"]),
        # a folder's contents land at the archive's top level: handlers/ and service/ (handler_runtime)
        "--extra-files", f"{files['config']},{files['labels']},{files['runtime']}",
        "--archive-format", "default",
        "--export-path", str(export),
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp)}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=ARCHIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(
            f"torch-model-archiver took over {ARCHIVER_TIMEOUT_S} s; check the disk"
        ) from None
    built = export / f"{model_name}.mar"
    if done.returncode != 0 or not built.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise FailedPrecondition(
            f"torch-model-archiver failed (exit {done.returncode}): {' | '.join(detail)}"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return built
