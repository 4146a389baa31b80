"""The run's machinery: seeding, the device and precision, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from service.errors import FailedPrecondition, InvalidArgument
from service.spec import TrainingSpec
from service.training.steps import DevicePlan

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "cosine", "step", "onecycle")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(training: TrainingSpec, model: nn.Module | None = None) -> DevicePlan:
    """`auto`: CUDA when there is one. Precision `auto`: bf16 autocast on CUDA when supported (else fp16
    with a GradScaler), fp32 on the CPU. channels_last on CUDA for models with convolutions."""
    has_cuda = torch.cuda.is_available()
    if training.device == "cuda" and not has_cuda:
        raise FailedPrecondition(
            "training.device is 'cuda' but this worker sees no CUDA device; use 'auto' or 'cpu'"
        )
    device = torch.device("cuda" if has_cuda and training.device != "cpu" else "cpu")
    on_cuda = device.type == "cuda"
    precision = training.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_cuda else "fp32"
    if precision == "fp16" and not on_cuda:
        raise InvalidArgument(
            "training.precision 'fp16' needs a CUDA device (this job runs on the CPU); "
            "use 'bf16', 'fp32' or 'auto'"
        )
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    convnet = model is not None and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if on_cuda:
        # a job's input size is fixed, so the one-off search for the fastest convolutions pays back
        torch.backends.cudnn.benchmark = True
    return DevicePlan(device, dtype, channels_last=on_cuda and convnet)


def make_optimizer(training: TrainingSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer over `params` only (the trainable ones)."""
    if not params:
        raise InvalidArgument(
            "the freeze settings leave no trainable parameter; lower freeze.depth or pick an earlier "
            "freeze.until_layer"
        )
    name, lr, wd = training.optimizer, training.lr, training.weight_decay
    foreach, fused = implementation(params)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=training.momentum, weight_decay=wd, foreach=foreach, fused=fused
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, foreach=foreach, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=foreach, fused=fused)
    if name == "rmsprop":
        # alpha and eps as torchvision's reference recipe (TF-style RMSprop for MobileNet/EfficientNet);
        # RMSprop has no fused kernel: foreach at most
        return torch.optim.RMSprop(
            params, lr=lr, momentum=training.momentum, weight_decay=wd, alpha=0.9, eps=0.0316,
            foreach=True,
        )  # fmt: skip
    raise InvalidArgument(f"Invalid optimizer {name!r}. Only {', '.join(OPTIMIZERS)} are supported.")


def implementation(params: list[nn.Parameter]) -> tuple[bool | None, bool | None]:
    """(foreach, fused): fused kernels on CUDA (one launch for all parameters), else foreach (one op
    over all tensors instead of a Python loop over them): the same update, fewer launches."""
    if params[0].device.type == "cuda":
        return None, True
    return True, None


def make_scheduler(
    training: TrainingSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, bool]:
    """(scheduler, stepped after every optimizer step?). cosine and onecycle run over all steps of all
    epochs; step divides the rate by 10 every third of the epochs, stepped per epoch."""
    name, total = training.scheduler, max(1, training.epochs * steps_per_epoch)
    if name == "none":
        return None, False
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if name == "step":
        step_size = max(1, training.epochs // 3)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1), False
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=training.lr, total_steps=total), True
    raise InvalidArgument(f"Invalid scheduler {name!r}. Only {', '.join(SCHEDULERS)} are supported.")
