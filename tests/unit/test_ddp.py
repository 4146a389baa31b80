"""DDP through the real training engine, on gloo, two processes on this CPU.

The equivalence: 2 ranks x batch 16 train to the same weights as 1 process x batch 32 (same global batch,
same sample order: each rank takes its shard of the one permutation), within 1e-6 after 2 epochs, on a
model without BatchNorm (timm's ConvNeXt-atto: LayerNorm, no dropout), every block trained.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from imagefolders import job_spec, make_image_folder, one_thread, write_truncated_png
from reliability import record

from service.records import EventKind
from service.settings import Settings
from service.spec import JobSpec
from service.tasks import task_for
from service.training import loaders
from service.training.checkpoints import load_checkpoint
from service.training.distributed import Group, RankReporter, Ranks
from service.training.loaders import Batch, EpochSampler
from service.training.loop import EpochPlan, train_one_epoch
from service.training.reporting import CollectingReporter
from service.training.runner import train
from service.training.steps import DevicePlan, Objective, Optimisation, Trainer
from tests.ports import free_ports

TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def settings(root: Path) -> Settings:
    return Settings(
        state_dir=root / "state", data_root=root / "data", torch_home=root / "torch", weights_root=root
    )


def spec(batch_size: int, world_size: int = 1, epochs: int = 2) -> JobSpec:
    return job_spec(
        model={"architecture": "timm/convnext_atto", "weights": "none"},
        data={"path": "ds", "val_fraction": 0.2},
        training={"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "feature_cache": False},
        early_stopping={"enabled": False},
        checkpointing={"keep_top_k": 2},
        resources={"gpus": 0, "processes_per_node": world_size},
    )


def run_rank(rank: int, world_size: int, port: int, root: Path, batch_size: int, results: Any) -> None:
    """One rank of a DDP job, as torchrun would start it (the environment torch's launchers set)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    reporter = CollectingReporter()
    outcome = train(spec(batch_size, world_size), root / "ddp", settings(root), reporter, Ranks.from_env())
    epochs = [d for k, _, d in reporter.events if k == EventKind.EPOCH]
    results.put((rank, outcome.status, outcome.metrics, epochs, len(reporter.events)))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    make_image_folder(root / "data" / "ds", classes=2, per_class=40)  # 64 to train, 16 to validate
    return root


@pytest.fixture(scope="module")
def two_ranks(root: Path) -> dict[int, Any]:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(run_rank, args=(2, free_ports(1)[0], root, 32, results), nprocs=2, join=True)
    found = [results.get() for _ in range(2)]
    return {rank: rest for rank, *rest in found}


@pytest.mark.slow
def test_two_ranks_of_half_the_batch_train_the_weights_one_process_trains(root: Path, two_ranks: Any) -> None:
    with one_thread():
        one = train(spec(32), root / "one", settings(root), CollectingReporter())
    assert one.status == "completed" and two_ranks[0][0] == two_ranks[1][0] == "completed"
    single = load_checkpoint(root / "one/checkpoints/last.pt")["model"]
    ddp = load_checkpoint(root / "ddp/checkpoints/last.pt")["model"]
    assert single.keys() == ddp.keys()
    worst = max((single[k].double() - ddp[k].double()).abs().max().item() for k in single)
    assert worst <= TOLERANCE, f"largest parameter difference {worst:.3g}"
    first = load_checkpoint(root / "ddp/checkpoints/epoch-0001.pt")["model"]
    assert any((ddp[k] != first[k]).any() for k in ddp)  # the second epoch moved the weights


@pytest.mark.slow
def test_every_rank_holds_the_same_averaged_metrics_and_only_rank_0_reports(two_ranks: Any) -> None:
    (_, metrics_0, epochs_0, events_0), (_, metrics_1, epochs_1, events_1) = two_ranks[0], two_ranks[1]
    assert metrics_0 == {k: v for k, v in metrics_1.items() if k != "epoch_time_s"} | {
        "epoch_time_s": metrics_0["epoch_time_s"]
    }
    assert {"val_loss", "val_accuracy", "train_loss"} <= set(metrics_0)
    assert epochs_0[-1]["val_loss"] == metrics_0["val_loss"]
    assert len(epochs_0) == 2 and epochs_1 == []  # rank 1 reports nothing
    assert events_0 > 0 and events_1 == 0


@pytest.mark.slow
def test_one_set_of_checkpoints_is_written(root: Path, two_ranks: Any) -> None:
    files = sorted(p.name for p in (root / "ddp" / "checkpoints").iterdir())
    assert files == ["best.pt", "epoch-0001.pt", "epoch-0002.pt", "last.pt"]


def test_the_ranks_shards_together_are_one_process_order_without_the_tail() -> None:
    whole = list(EpochSampler(10, seed=3, shuffle=True))
    shards = [list(EpochSampler(10, 3, True, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert [item for step in zip(*shards, strict=True) for item in step] == whole[:9]


def test_validation_shards_cover_every_image_once() -> None:
    shards = [list(EpochSampler(7, 0, False, rank=r, world_size=2)) for r in range(2)]
    assert sorted(i for shard in shards for _, i in shard) == list(range(7))


def run_rank_with_a_broken_image(rank: int, port: int, root: Path, results: Any) -> None:
    """One of 2 ranks, 1 image each per step, on a dataset too big to decode up front (so each rank
    decodes its own shard as it goes), one image of which fails to decode."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    loaders.CACHE_MAX_BYTES = 0  # as a large dataset: decoded per batch, not all at once up front
    broken = job_spec(
        model={"architecture": "timm/convnext_atto", "weights": "none"},  # no BatchNorm: batches of 1
        data={"path": "broken", "val_path": "broken-val"},
        training={"epochs": 1, "batch_size": 2, "feature_cache": False, "augmentation": "none"},
        early_stopping={"enabled": False},
        resources={"gpus": 0, "processes_per_node": 2},
    )
    # a short collective timeout: before the fix the group hung here until it passed
    quick = settings(root).model_copy(update={"collective_timeout_s": 30.0})
    reporter = CollectingReporter()
    outcome = train(broken, root / f"broken-{rank}", quick, reporter, Ranks.from_env())
    results.put((rank, outcome.status, [(k, m, d) for k, m, d in reporter.events if k != EventKind.PROGRESS]))


@pytest.mark.slow
@pytest.mark.reliability
def test_a_batch_that_fails_to_decode_on_one_rank_is_skipped_by_all_and_reported(root: Path) -> None:
    """16 training images, 1 per rank per step: the rank whose image is the truncated one has an empty
    batch. Every rank skips that step together (7 steps, not a hang until the collective timeout, nor
    ranks pairing different steps' all-reduces), and rank 0 reports the file whichever rank read it."""
    make_image_folder(root / "data" / "broken", classes=3, per_class=5)
    write_truncated_png(root / "data" / "broken" / "class_0" / "zz_truncated.png")
    make_image_folder(root / "data" / "broken-val", classes=3, per_class=2)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(run_rank_with_a_broken_image, args=(free_ports(1)[0], root, results), nprocs=2, join=True)
    found = {rank: rest for rank, *rest in (results.get() for _ in range(2))}
    assert found[0][0] == found[1][0] == "completed"
    events = found[0][1]
    (epoch,) = [d for k, _, d in events if k == EventKind.EPOCH]
    assert epoch["steps"] == 7  # 16 images / global batch 2 = 8 steps, less the one no rank took
    warnings = [m for k, m, _ in events if k == EventKind.WARNING]
    assert any("skipped 1 file(s) in epoch 1" in m for m in warnings), warnings
    assert found[1][1] == []  # rank 1 reports nothing itself
    record(
        "distributed",
        "a 2-rank DDP job whose one rank gets a batch in which no image decodes (truncated PNG, 1 per rank)",
        1,
        "every rank skipped that step together (7 of 8 steps), the job completed, the file was reported "
        "in the job's events; before the fix gloo aborted on a collective size mismatch",
    )


def frozen_prefix_spec(feature_cache: bool) -> JobSpec:
    return job_spec(
        freeze={"until_layer": "features.12"},  # mobilenet_v3_small's blocks, in eval mode
        data={"path": "ds", "val_fraction": 0.2},
        # sgd: Adam's first steps amplify float noise (the prefix batches differently when cached)
        training={"epochs": 2, "batch_size": 8, "augmentation": "none", "feature_cache": feature_cache,
                  "optimizer": "sgd"},
        early_stopping={"enabled": False},
        checkpointing={"keep_top_k": 2},
        resources={"gpus": 0, "processes_per_node": 2},
    )  # fmt: skip


def run_rank_frozen(rank: int, port: int, root: Path, feature_cache: bool, results: Any) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    reporter = CollectingReporter()
    folder = root / f"frozen-{'cached' if feature_cache else 'images'}"
    outcome = train(frozen_prefix_spec(feature_cache), folder, settings(root), reporter, Ranks.from_env())
    results.put((rank, outcome.status, [d for k, _, d in reporter.events if k == EventKind.INFO]))


@pytest.mark.slow
def test_two_ranks_caching_the_frozen_features_train_the_weights_they_train_on_images(root: Path) -> None:
    """Each rank runs the frozen prefix over its shard once and the ranks exchange the features; each
    epoch then takes the same per-rank batches as from the images, so the weights agree."""
    context = mp.get_context("spawn")
    infos = {}
    for cache in (True, False):
        results = context.SimpleQueue()
        mp.spawn(run_rank_frozen, args=(free_ports(1)[0], root, cache, results), nprocs=2, join=True)
        found = {rank: rest for rank, *rest in (results.get() for _ in range(2))}
        assert found[0][0] == found[1][0] == "completed"
        infos[cache] = found[0][1]
    assert any(d.get("feature_cache") is True and d.get("images") == 64 for d in infos[True])
    assert not any(d.get("feature_cache") for d in infos[False])
    cached = load_checkpoint(root / "frozen-cached/checkpoints/last.pt")
    images = load_checkpoint(root / "frozen-images/checkpoints/last.pt")
    worst = max(
        (cached["model"][k].double() - images["model"][k].double()).abs().max().item()
        for k in images["model"]
    )
    assert worst <= 1e-5, f"largest parameter difference {worst:.3g}"
    first = load_checkpoint(root / "frozen-cached/checkpoints/epoch-0001.pt")["model"]
    assert any((cached["model"][k] != first[k]).any() for k in first)  # the second epoch trained


class StopAtPoll(CollectingReporter):
    """Asks to stop from its `at`-th stop check on (rank 0's service cancelling the job)."""

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at, self.polls = at, 0

    def stop_requested(self) -> str | None:
        self.polls += 1
        return "cancelled" if self.at is not None and self.polls >= self.at else None


def run_rank_agreeing(rank: int, port: int, results: Any) -> None:
    """6 batches per rank through the real loop and a real gloo group: rank 1's third batch has no image,
    rank 0's service asks to stop at the fifth check. Counts the all-reduces the loop's checks make (DDP's
    gradient all-reduce runs in its C++ reducer, not through torch.distributed.all_reduce)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    group = Group(Ranks.from_env(), timeout_s=60).start("cpu")
    torch.manual_seed(0)
    model = group.wrap(torch.nn.Linear(4, 3))
    calls = []
    real = torch.distributed.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    torch.distributed.all_reduce = counted  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(rank)
    batches = [Batch(torch.randn(2, 4, generator=generator), torch.tensor([0, 2]), []) for _ in range(6)]
    if rank == 1:
        batches[2] = Batch(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), [])
    reporter = RankReporter(StopAtPoll(5 if rank == 0 else None), group)
    task = task_for("multiclass")
    trainer = Trainer(
        model,
        Objective(task, task.criterion(), num_classes=3),
        Optimisation(torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)),
        DevicePlan(torch.device("cpu")),
    )
    result = train_one_epoch(trainer, batches, EpochPlan(1), reporter, agree=reporter.stop_or_skip)  # type: ignore[arg-type]
    torch.distributed.all_reduce = real
    weights = [p.detach().tolist() for p in model.parameters()]  # lists: a tensor would be shared memory
    group.close()
    results.put((rank, result.stopped, result.steps, len(calls), weights))


@pytest.mark.slow
def test_the_ranks_agree_to_stop_and_to_skip_an_empty_batch_in_one_all_reduce_per_step() -> None:
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(run_rank_agreeing, args=(free_ports(1)[0], results), nprocs=2, join=True)
    found = {rank: rest for rank, *rest in (results.get() for _ in range(2))}
    for rank in (0, 1):
        stopped, steps, all_reduces, _ = found[rank]
        # checks at batches 0..4: batch 2 skipped by both (rank 1's was empty), the stop seen at batch 4
        assert (stopped, steps) == ("cancelled", 3), rank
        assert all_reduces == 5, f"rank {rank}: {all_reduces} all-reduces for 5 checks"
    assert found[0][3] == found[1][3]  # the same steps on both ranks: gradients averaged in step
