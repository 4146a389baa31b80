"""The peer a user would pick instead of tuneserve: one fine-tune as a plain Lightning script.

  python -m bench.lightning_finetune '<config JSON>'      (bench.lightning_compare runs it)

`Trainer` with a `BaseFinetuning` callback that freezes every top-level block of the network up to and
including `until_layer` (none: a full fine-tune), `ModelCheckpoint` writing last and best, the data as
torchvision `ImageFolder`s. The network and its starting weights come from tuneserve's builder, so both
sides start from the same tensors (and a head drawn under the same seed); everything after that is
Lightning's. Prints one JSON line: the wall-clock marks, the checkpoint and the last validation accuracy.
"""

from __future__ import annotations

import time

STARTED_AT = time.time()  # before the imports: a user's script pays for them too

import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from service.spec import ModelSpec  # noqa: E402
from service.training.architecture import interpolation_mode  # noqa: E402
from service.training.builder import build_model  # noqa: E402

IMPORTS_DONE_AT = time.time()


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, optimizer: str, lr: float) -> None:
        super().__init__()
        self.model, self.optimizer_name, self.lr = model, optimizer, lr
        self.loss = nn.CrossEntropyLoss()
        self.val_accuracy = float("nan")
        self._correct = self._seen = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        loss = self.loss(self.model(images), targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self.model(images)
        self.log("val_loss", self.loss(logits, targets), on_epoch=True, batch_size=len(targets))
        self._correct += int((logits.argmax(1) == targets).sum())
        self._seen += len(targets)

    def on_validation_epoch_end(self) -> None:
        self.val_accuracy = self._correct / max(self._seen, 1)
        self.log("val_accuracy", self.val_accuracy)
        self._correct = self._seen = 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # BaseFinetuning froze the prefix in setup(), before this: only the trainable rest is handed over
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw":  # weight_decay 0 as tuneserve's default (torch's is 0.01)
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        raise ValueError(f"optimizer {self.optimizer_name!r}: only adamw and sgd are wired here")


class FreezePrefix(BaseFinetuning):
    """Freeze the top-level blocks up to and including `until_layer`, their BatchNorm in eval mode."""

    def __init__(self, until_layer: str | None) -> None:
        super().__init__()
        self.until_layer = until_layer

    def prefix(self, pl_module: L.LightningModule) -> list[nn.Module]:
        if self.until_layer is None:
            return []
        names = [name for name, _ in pl_module.model.named_children()]
        if self.until_layer not in names:
            raise ValueError(f"until_layer {self.until_layer!r} is not a block; the blocks: {names}")
        children = list(pl_module.model.children())
        return children[: names.index(self.until_layer) + 1]

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(self.prefix(pl_module), train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Any) -> None:
        # Lightning's train_bn=False only stops the statistics from moving and normalises by each batch's;
        # tuneserve's freeze.batchnorm `eval` uses the pretrained running statistics: eval() does that
        for module in self.prefix(pl_module):
            module.eval()


def loaders(config: dict[str, Any], preprocessing: Any) -> tuple[DataLoader[Any], DataLoader[Any]]:
    transform = transforms.Compose(
        [
            transforms.Resize(
                preprocessing.resize_size, interpolation=interpolation_mode(preprocessing.interpolation)
            ),
            transforms.CenterCrop(preprocessing.crop_size),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )
    train = datasets.ImageFolder(config["train_dir"], transform=transform)
    val = datasets.ImageFolder(config["val_dir"], transform=transform)
    batch, workers = config["batch_size"], config["num_workers"]
    return (
        DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers),
        DataLoader(val, batch_size=batch, shuffle=False, num_workers=workers),
    )


def fit(config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    L.seed_everything(config["seed"], verbose=False)
    num_classes = len(list(Path(config["train_dir"]).iterdir()))
    built = build_model(
        ModelSpec(architecture=config["architecture"], weights=config["weights"]),
        num_classes,
        torch_home=Path(config["torch_home"]),
    )
    preprocessing = built.preprocessing.for_image_size(config["image_size"])
    train, val = loaders(config, preprocessing)
    module = Classifier(built.model, config["optimizer"], config["lr"])
    checkpoints = ModelCheckpoint(
        dirpath=config["checkpoint_dir"], monitor="val_loss", mode="min", save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu" if config["device"] == "cpu" else "auto",
        devices=1,
        max_epochs=config["epochs"],
        logger=False,  # tuneserve's job logs no TensorBoard or W&B here either
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,  # tuneserve runs no sanity pass
        callbacks=[FreezePrefix(config["until_layer"]), checkpoints],
        default_root_dir=config["checkpoint_dir"],
    )
    yield "fit_started_at", time.time()
    trainer.fit(module, train, val)
    yield "fit_done_at", time.time()
    yield "checkpoint", checkpoints.last_model_path
    yield "val_accuracy", module.val_accuracy
    yield "trainable_params", sum(p.numel() for p in module.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> None:
    config = json.loads((argv or sys.argv[1:])[0])
    torch.set_num_threads(config["threads"])
    result: dict[str, Any] = {"started_at": STARTED_AT, "imports_done_at": IMPORTS_DONE_AT}
    result |= dict(fit(config))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
