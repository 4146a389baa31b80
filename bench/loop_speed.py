"""Benchmark 1: our training loop against a plain PyTorch loop: same model, batch, precision and data.

"Ours" is what a job runs: select_device (precision, channels_last, cudnn benchmark), make_optimizer
(foreach/fused), apply_freeze + split_frozen_prefix + prepare's forward (prefix under no_grad),
then service.training.loop.train_one_epoch (metrics, progress events). The reference is the loop a
PyTorch user writes by hand with the same settings. Rounds alternate between the two so machine noise
hits both alike; the figure is the ratio of median images/s. Goal: at least 0.97.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from bench.common import device_name, emit, median, ratio, timed

NAME = "loop_speed"


@dataclass(frozen=True)
class Size:
    architecture: str
    image_size: int
    batch_size: int
    steps: int  # per round
    rounds: int


QUICK = Size("resnet18", 64, 16, 3, 3)
FULL = Size("resnet18", 128, 32, 8, 5)
GPU = Size("resnet50", 224, 256, 20, 5)

# resnet blocks frozen in the "frozen" case: everything up to and including layer3, like the figure
FROZEN_UNTIL = "layer3"


def run(size: Size) -> dict[str, Any]:
    from service.spec import FreezeSpec, TrainingSpec
    from service.training.optim import select_device

    plan = select_device(TrainingSpec(optimizer="sgd", scheduler="none"), _model(size))
    batches = _batches(size, plan.device.type == "cuda")
    cases: dict[str, Any] = {}
    for case, freeze in (("full", FreezeSpec()), ("frozen", FreezeSpec(until_layer=FROZEN_UNTIL))):
        ours = _ours(size, plan, freeze)
        reference = _reference(size, plan, frozen=freeze.until_layer is not None)
        ours(batches[:1]), reference(batches[:1])  # warm-up: allocator, cudnn search, lazy init
        ours_s, reference_s = [], []
        for _ in range(size.rounds):
            ours_s.append(timed(partial(ours, batches)))
            reference_s.append(timed(partial(reference, batches)))
        images = size.batch_size * len(batches)
        ours_ips, reference_ips = images / median(ours_s), images / median(reference_s)
        cases[case] = {
            "ours_img_per_s": round(ours_ips, 1),
            "reference_img_per_s": round(reference_ips, 1),
            "ratio": round(ratio(ours_ips, reference_ips), 4),
        }
    return {
        "benchmark": NAME,
        "device": device_name(),
        "plan": plan.describe(),
        "model": size.architecture,
        "image_size": size.image_size,
        "batch_size": size.batch_size,
        "steps_per_round": size.steps,
        "rounds": size.rounds,
        **cases,
        "goal": 0.97,
    }


def _model(size: Size) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = getattr(torchvision.models, size.architecture)(weights=None, num_classes=10)
    return model


def _batches(size: Size, pin: bool) -> list[tuple[Tensor, Tensor, list[Any]]]:
    """Synthetic images in host memory (pinned on CUDA), as the loader would hand them over."""
    generator = torch.Generator().manual_seed(1)
    batches: list[tuple[Tensor, Tensor, list[Any]]] = []
    for _ in range(size.steps):
        images = torch.randn(size.batch_size, 3, size.image_size, size.image_size, generator=generator)
        targets = torch.randint(0, 10, (size.batch_size,), generator=generator)
        if pin:
            images, targets = images.pin_memory(), targets.pin_memory()
        batches.append((images, targets, []))
    return batches


def _ours(size: Size, plan: Any, freeze: Any, *, compile_model: bool = False) -> Any:
    from service.spec import TrainingSpec
    from service.tasks import task_for
    from service.training import freezing
    from service.training.distributed import Group, Ranks
    from service.training.loop import EpochPlan, train_one_epoch
    from service.training.optim import make_optimizer
    from service.training.prepare import _make_forward, _trainable_rest
    from service.training.reporting import CollectingReporter
    from service.training.steps import Objective, Optimisation, Trainer

    model = _prepared(_model(size), plan)
    frozen = freezing.apply_freeze(model, freeze, ("fc",), architecture=size.architecture)
    optimizer = make_optimizer(TrainingSpec(optimizer="sgd", lr=0.01), freezing.trainable_parameters(model))
    split, group = freezing.split_frozen_prefix(model, frozen), Group(Ranks())  # one process, as a job
    forward = _make_forward(model, split, _trainable_rest(split, group), group, compile_model)
    scaler = torch.amp.GradScaler(plan.device.type, enabled=plan.autocast_dtype == torch.float16)
    objective = Objective(task_for("multiclass"), nn.CrossEntropyLoss(), num_classes=10)
    trainer = Trainer(forward, objective, Optimisation(optimizer, scaler), plan)

    def epoch(batches: list[Any]) -> None:
        freezing.set_train_mode(model, frozen, "eval")
        train_one_epoch(trainer, batches, EpochPlan(1), CollectingReporter())  # type: ignore[arg-type]

    return epoch


def _reference(size: Size, plan: Any, *, frozen: bool) -> Any:
    """The hand-written loop: same precision and memory format, the prefix under no_grad when frozen."""
    model = _prepared(_model(size), plan)
    names = [name for name, _ in model.named_children()]
    cut = names.index(FROZEN_UNTIL) + 1 if frozen else 0
    children = dict(model.named_children())
    prefix = nn.Sequential(*[children[n] for n in names[:cut]])
    body = [children[n] for n in names[cut:-1]]
    rest = nn.Sequential(*body, nn.Flatten(1), children["fc"])
    for p in prefix.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = plan.device.type == "cuda"
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True if on_cuda else None)
    scaler = torch.amp.GradScaler(plan.device.type, enabled=plan.autocast_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss()
    memory_format = torch.channels_last if plan.channels_last else torch.preserve_format

    def epoch(batches: list[Any]) -> None:
        model.train()
        prefix.eval()
        for images, targets, _ in batches:
            images = images.to(plan.device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(plan.device, non_blocking=True)
            with torch.autocast(
                plan.device.type, plan.autocast_dtype, enabled=plan.autocast_dtype is not None
            ):
                with torch.no_grad():
                    features = prefix(images)
                loss = criterion(rest(features), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return epoch


def _prepared(model: nn.Module, plan: Any) -> nn.Module:
    model.to(plan.device)
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    emit(run(QUICK if args.quick else (GPU if torch.cuda.is_available() else FULL)))


if __name__ == "__main__":
    main()
