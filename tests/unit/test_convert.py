"""Proto <-> domain translation: specs round-trip, unset fields take the spec's defaults."""

from __future__ import annotations

import pytest

from service.api import convert
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.errors import InvalidArgument
from service.records import EventKind, JobEvent, JobState
from service.spec import JobSpec

FULL = {
    "name": "pets",
    "task": "binary",
    "threshold": 0.7,
    "model": {"architecture": "resnet18", "weights": "file", "weights_file": "/w/r.pt"},
    "data": {"path": "pets", "val_path": "pets-val", "val_fraction": 0.3, "num_workers": 2},
    "freeze": {"until_layer": "layer2", "batchnorm": "train"},
    "training": {"epochs": 4, "batch_size": 16, "image_size": 96, "optimizer": "sgd", "lr": 0.05,
                 "momentum": 0.8, "weight_decay": 0.01, "scheduler": "step", "augmentation": "standard",
                 "seed": 7, "precision": "bf16", "device": "cpu", "compile": True, "feature_cache": False,
                 "max_steps_per_epoch": 3},
    "early_stopping": {"enabled": False, "monitor": "val_accuracy", "mode": "max", "patience": 5,
                       "min_delta": 0.01},
    "checkpointing": {"keep_top_k": 3},
    "logging": {"tensorboard": False,
                "wandb": {"mode": "offline", "project": "p", "entity": "e", "tags": ["a"]}},
    "serving": {"enabled": False, "model_name": "pets-v", "batch_size": 4, "max_batch_delay_ms": 10,
                "workers": 2, "top_k": 2},
}  # fmt: skip


def test_a_spec_with_every_field_set_round_trips_through_the_proto() -> None:
    spec = JobSpec.model_validate(FULL)
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec


def test_unset_and_empty_fields_take_the_specs_defaults() -> None:
    message = pb.JobSpec(name="x", model=pb.ModelSpec(architecture="resnet18"), data=pb.DataSpec(path="d"))
    message.training.optimizer = ""  # proto3 cannot tell "" from unset: it means "the default"
    assert convert.spec_from_proto(message) == JobSpec.model_validate(
        {"name": "x", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}
    )


def test_an_event_carries_its_data_and_the_state_it_was_recorded_in() -> None:
    event = JobEvent("job-1", 4, 1_700_000_000.5, EventKind.EPOCH, "epoch 1", {"epoch": 1, "val_loss": 0.5})
    message = convert.event_to_proto(event, JobState.RUNNING)
    assert (message.seq, message.kind, message.state) == (4, "EPOCH", pb.RUNNING)
    assert dict(message.data) == {"epoch": 1.0, "val_loss": 0.5}
    assert message.time.ToNanoseconds() == 1_700_000_000_500_000_000


def test_the_unspecified_state_is_not_a_filter() -> None:
    with pytest.raises(InvalidArgument, match=r"states\[1\] JOB_STATE_UNSPECIFIED"):
        convert.states_from_proto([pb.QUEUED, pb.JOB_STATE_UNSPECIFIED])
