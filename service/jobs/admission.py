"""The checks a parsed spec must pass on this machine before it is queued (run by CreateJob).

spec.py checks what a spec says; admission checks it against the machine: the architecture is known,
its weights are in the local cache, the dataset is under the data root and usable, the freeze request
fits the model. Every error names the spec field (`spec.freeze.depth`), the bad value, what is allowed
and how to fix it. The training modules are imported here, inside functions, so a server process that
never creates a job does not pay for importing torch at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.devices import check_gpus_fit, with_resolved_gpus
from service.errors import FailedPrecondition, TuneserveError
from service.settings import Settings
from service.spec import JobSpec, sync_batchnorm_problem
from service.tasks import task_for

if TYPE_CHECKING:
    from service.training.layers import ModelDescription
    from service.training.scan import DatasetInfo

_NAMED_FIELD = re.compile(r"^(model|data|freeze|training|serving|early_stopping|logging|resources)\.[a-z_]+")


@dataclass(frozen=True)
class AdmittedJob:
    """A spec that passed every check, with what the checks found."""

    spec: JobSpec
    class_names: tuple[str, ...]
    num_images: int
    description: ModelDescription
    warnings: tuple[str, ...] = ()


def admit(spec: JobSpec, settings: Settings) -> AdmittedJob:
    """Check `spec` against this machine; raises the first problem as a domain error naming its field."""
    from service.training import registry, weights

    with _field("model.architecture"):
        architecture = registry.check_architecture(spec.model.architecture)
    with _field("model.weights"):
        weights.resolve_weights(spec.model, settings.torch_home, weights_root=settings.weights_dir)
    if settings.launcher != "kubernetes":  # on Kubernetes the cluster's GPUs and nodes count, not ours
        with _field("training.device"):
            _check_device(spec)
        with _field("resources.gpus"):
            check_gpus_fit(spec, settings)
        with _field("resources.nodes"):
            _check_placeable(spec)
    spec = with_resolved_gpus(spec, settings)  # recorded: the stored spec says what the job gets
    with _field("training.sync_batchnorm"):
        _check_sync_batchnorm(spec)
    info, val_info = _scan_data(spec, settings)
    warnings = [*_skip_warnings(info), *_skip_warnings(val_info)]
    description = _describe(spec, architecture, len(info.class_names), settings)
    if spec.serving.enabled and not settings.torchserve_enabled:
        warnings.append(
            "spec.serving.enabled is true but this service runs with TUNESERVE_TORCHSERVE_ENABLED=false: "
            "the job will be trained and packaged, not served"
        )
    return AdmittedJob(spec, info.class_names, len(info.samples), description, tuple(warnings))


def _scan_data(spec: JobSpec, settings: Settings) -> tuple[DatasetInfo, DatasetInfo | None]:
    from service.training.data_root import resolve_under_root
    from service.training.scan import scan_manifest, split_stratified
    from service.training.scan_cache import SCANS

    data, root, pixels, task = spec.data, settings.data_root, settings.max_image_pixels, task_for(spec.task)
    if task.reads_manifest:
        assert data.manifest is not None  # JobSpec requires it for a task that reads a manifest
        with _field("data.manifest"):
            info = scan_manifest(data.manifest, root, max_image_pixels=pixels)
    else:
        with _field("data.path"):
            info = SCANS.scan_dataset(Path(data.path), root, task=spec.task, max_image_pixels=pixels)
    if not data.val_path:
        with _field("data.val_fraction"):
            split_stratified(info.samples, data.val_fraction, spec.training.seed)
        return info, None
    with _field("data.val_path"):
        resolve_under_root(data.val_path, root, "data.val_path")
        if task.reads_manifest:
            val_info = scan_manifest(data.val_path, root, max_image_pixels=pixels)
        else:
            val_info = SCANS.scan_dataset(Path(data.val_path), root, task=spec.task, max_image_pixels=pixels)
        task.check_val_classes(info.class_names, val_info.class_names)
    return info, val_info


def _describe(spec: JobSpec, architecture: str, num_classes: int, settings: Settings) -> ModelDescription:
    from service.training.layers import describe_model

    outputs = task_for(spec.task).output_units(num_classes)
    # freeze errors name their own field (freeze.depth, freeze.until_layer); anything else is the image size
    with _field("training.image_size"):
        return describe_model(
            architecture,
            image_size=spec.training.image_size,
            num_classes=outputs,
            freeze=spec.freeze,
            torch_home=settings.torch_home,
        )


def _check_device(spec: JobSpec) -> None:
    if spec.training.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise FailedPrecondition(
            "training.device 'cuda' was asked for but this machine has no CUDA device; "
            "use 'auto' (the GPU when there is one) or 'cpu'"
        )


def _check_placeable(spec: JobSpec) -> None:
    """FailedPrecondition for a job this service cannot place: with local workers it trains on one
    machine only (the Kubernetes launcher places a job on several)."""
    nodes = spec.resources.nodes
    if nodes > 1:
        raise FailedPrecondition(
            f"resources.nodes {nodes}: this service trains on one machine and has no Kubernetes launcher "
            f"configured to place a job on {nodes}; ask for resources.nodes 1 (with up to the GPUs of this "
            "machine in resources.gpus_per_node), or submit the job to a service deployed with the "
            "Kubernetes launcher (TUNESERVE_LAUNCHER=kubernetes, docker/k8s/trainer/)"
        )


def _check_sync_batchnorm(spec: JobSpec) -> None:
    """FailedPrecondition when the GPUs this machine gives the job cannot run SyncBatchNorm (the spec
    alone could not tell: it left resources.gpus to the machine's default)."""
    if (problem := sync_batchnorm_problem(spec)) is not None:
        raise FailedPrecondition(problem)


def _skip_warnings(info: DatasetInfo | None) -> list[str]:
    if info is None or not info.skipped:
        return []
    from service.training.scan import skip_summary

    summary = skip_summary(info.skipped, examples=3)
    return [f"{summary['skipped']} file(s) under {info.root} will be skipped: {summary['reasons']}"]


@contextmanager
def _field(name: str) -> Iterator[None]:
    """Re-raise a domain error with the spec field it is about in front: `spec.data.path: ...`."""
    try:
        yield
    except TuneserveError as exc:
        raise type(exc)(name_field(name, exc.message)) from exc


def name_field(name: str, message: str) -> str:
    """`message` led by `spec.<field>`: kept when it already names a field, else prefixed with `name`."""
    if message.startswith("spec."):
        return message
    if _NAMED_FIELD.match(message):
        return f"spec.{message}"
    return f"spec.{name}: {message}"
