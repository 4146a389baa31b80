"""ServingReplica.sync when the shared store offers nothing: it keeps serving what it serves.

No TorchServe runs here (a stand-in for a running one would be a mock): the test checks the guard's
decision, its warning and the registry it leaves, not TorchServe's side (test_serving_only.py has
the sync against a real TorchServe).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.packaging.served_registry import ServedRegistry, ServedVersion
from service.packaging.serving_only import ServingReplica
from service.settings import Settings
from tests.ports import free_ports


def test_an_empty_store_does_not_unserve_everything(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (management,) = free_ports(1)
    settings = Settings(
        state_dir=tmp_path / "replica",
        model_store_dir=tmp_path / "shared" / "model_store",
        torchserve_management_port=management,
    )
    settings.model_store.mkdir(parents=True)  # mounted, but lists empty
    registry = ServedRegistry(tmp_path / "replica" / "replica_models.json")
    served = ServedVersion(
        version="1", job_id="job-1", archive="pets-v1.mar", sha256="0" * 64, checkpoint="", batch_size=1,
        max_batch_delay_ms=0, workers=1, top_k=3, served_at=0.0,
    )  # fmt: skip
    registry.add("pets", served, make_default=True)
    with caplog.at_level(logging.WARNING, logger="service.packaging.serving_only"):
        ServingReplica(settings, registry).sync()
    assert "offers nothing to serve now; keeping what is served" in caplog.text
    assert [(e.name, e.default, list(e.versions)) for e in registry.entries()] == [("pets", "1", ["1"])]
    assert [e.name for e in ServedRegistry(registry.path).entries()] == ["pets"]
