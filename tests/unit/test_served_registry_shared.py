"""The served registry shared by processes (control-plane replicas on one state volume), and the plan
that brings a TorchServe to what it serves (service.packaging.served_sync)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from service.errors import NotFound
from service.packaging.served_registry import ServedEntry, ServedRegistry, ServedVersion
from service.packaging.served_sync import Held, HeldVersions, ModelPlan, SyncPlan, plan_sync


def _served(version: str, job: str = "job") -> ServedVersion:
    return ServedVersion(
        version=version, job_id=job, archive=f"m-v{version}.mar", sha256="0" * 64, checkpoint="",
        batch_size=1, max_batch_delay_ms=0, workers=1, top_k=3, served_at=0.0,
    )  # fmt: skip


def _promote_many(path: str, prefix: str, count: int, start: multiprocessing.synchronize.Event) -> None:
    registry = ServedRegistry(Path(path))  # made before the others write: its memory goes stale at once
    start.wait()
    for i in range(count):
        registry.add(f"{prefix}-{i}", _served("1", f"{prefix}-{i}"), make_default=True)
        registry.add(f"{prefix}-{i}", _served("2", f"{prefix}-{i}"), make_default=False)


def test_processes_promoting_at_once_lose_nothing(tmp_path: Path):
    path = tmp_path / "torchserve" / "served_models.json"
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_promote_many, args=(str(path), p, 40, start)) for p in ("a", "b", "c")]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    entries = ServedRegistry(path).entries()
    assert len(entries) == 120
    assert all(sorted(e.versions) == ["1", "2"] and e.default == "1" for e in entries)


def test_a_registry_reads_what_another_instance_changed(tmp_path: Path):
    path = tmp_path / "served_models.json"
    mine, theirs = ServedRegistry(path), ServedRegistry(path)
    theirs.add("pets", _served("1"), make_default=True)
    assert mine.get("pets") is not None  # no restart needed to see another replica's promotion
    mine.add("pets", _served("2"), make_default=True)  # starts from theirs: version 1 is kept
    assert sorted(theirs.get("pets").versions) == ["1", "2"]  # type: ignore[union-attr]
    theirs.remove("pets")
    assert mine.entries() == [] and mine.remove("pets") is None  # already gone: nothing to do


def test_the_plan_registers_what_is_missing_moves_defaults_and_drops_the_default_last():
    wanted = {
        "new": ServedEntry("new", "2", {"1": _served("1"), "2": _served("2")}),
        "moved": ServedEntry("moved", "3", {"1": _served("1"), "3": _served("3")}),
        "same": ServedEntry("same", "1", {"1": _served("1")}),
    }
    have = {
        "moved": Held("1", frozenset({"1", "2"})),  # 2 unserved elsewhere, 3 promoted elsewhere
        "same": Held("1", frozenset({"1"})),
        "gone": Held("5", frozenset({"4", "5", "6"})),  # the whole model unserved elsewhere
    }
    plan = plan_sync(wanted, have)
    assert [(m.name, [s.version for s in m.register], m.default) for m in plan.models] == [
        ("moved", ["3"], "3"),
        ("new", ["1", "2"], "2"),
    ]
    assert plan.unregister == (("gone", "4"), ("gone", "6"), ("gone", "5"), ("moved", "2"))
    rollback = plan_sync({"same": ServedEntry("same", "1", {"1": _served("1"), "2": _served("2")})},
                         {"same": Held("2", frozenset({"1", "2"}))})  # fmt: skip
    assert rollback == SyncPlan(models=(ModelPlan("same", (), "1"),))
    assert not plan_sync(wanted, {n: Held(e.default, frozenset(e.versions)) for n, e in wanted.items()})
    assert plan_sync({}, {}) == SyncPlan()


def test_held_versions_follow_torchserve_rules():
    held = HeldVersions()
    held.registered("pets", "2")
    held.registered("pets", "1")
    assert held.get("pets") == Held("2", frozenset({"1", "2"}))  # the first registered is the default
    held.made_default("pets", "3")  # not held: nothing changes
    held.made_default("pets", "1")
    held.unregistered("pets", "1")
    assert held.get("pets") == Held("2", frozenset({"2"}))
    held.unregistered("pets", "2")
    assert held.get("pets") is None and not held.holds("pets", "2")


def test_a_default_set_on_a_version_another_process_just_removed_is_not_found(tmp_path: Path):
    path = tmp_path / "served_models.json"
    mine, theirs = ServedRegistry(path), ServedRegistry(path)
    mine.add("pets", _served("1"), make_default=True)
    mine.add("pets", _served("2"), make_default=False)
    assert mine.get("pets") is not None  # read: mine now holds both versions in memory
    theirs.remove("pets", "2")
    with pytest.raises(NotFound, match=r"no version '2'.*versions: 1"):
        mine.set_default("pets", "2")
    theirs.remove("pets")
    with pytest.raises(NotFound, match="not served"):
        mine.set_default("pets", "1")
    assert ServedRegistry(path).entries() == []
