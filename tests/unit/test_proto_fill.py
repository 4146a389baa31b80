"""service.api.proto_fill against protobuf's own json_format.ParseDict: the same bytes or the same error."""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import convert
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.proto_fill import _plain, message_from_dict
from service.spec import JobSpec
from tests.integration.fuzzing import messages
from tests.unit.test_convert import FULL


def parse_dict(data: Any, cls: type[Any]) -> bytes | str:
    """What json_format makes of `data`: the message's bytes, or its error's type."""
    try:
        return json_format.ParseDict(data, cls(), ignore_unknown_fields=True).SerializeToString(
            deterministic=True
        )
    except Exception as exc:
        return type(exc).__name__


def fill(data: Any, cls: type[Any]) -> bytes | str:
    try:
        return message_from_dict(data, cls()).SerializeToString(deterministic=True)
    except Exception as exc:
        return type(exc).__name__


def test_the_job_spec_is_filled_directly_and_not_through_json_format(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _plain(pb.JobSpec.DESCRIPTOR)
    assert not _plain(pb.JobEvent.DESCRIPTOR)  # a Struct: json_format's
    data = convert._drop_none(JobSpec.model_validate(FULL).to_dict())
    expected = parse_dict(data, pb.JobSpec)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("json_format.ParseDict was called")

    monkeypatch.setattr(json_format, "ParseDict", refuse)
    assert fill(data, pb.JobSpec) == expected


@pytest.mark.parametrize(
    "spec",
    [FULL, {"name": "x", "model": {"architecture": "resnet18"}, "data": {"path": "d"}}],
    ids=["every-field", "defaults"],
)
def test_a_validated_spec_gives_json_formats_bytes(spec: dict[str, Any]) -> None:
    data = convert._drop_none(JobSpec.model_validate(spec).to_dict())
    assert fill(data, pb.JobSpec) == parse_dict(data, pb.JobSpec)
    assert isinstance(fill(data, pb.JobSpec), bytes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(pb.JobSpec))
def test_any_job_spec_as_json_gives_json_formats_bytes(message: Any) -> None:
    # both of protobuf's JSON spellings: int64 as strings, "NaN" and "Infinity", camelCase names
    for names in (True, False):
        data = json_format.MessageToDict(message, preserving_proto_field_name=names)
        assert fill(data, pb.JobSpec) == parse_dict(data, pb.JobSpec)


values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5),
    st.sampled_from(["PENDING", "RUNNING", "NaN", "-Infinity", "1", "1e3", "resnet18"]),
    st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_wrong_values_give_json_formats_result_or_error(data: st.DataObject) -> None:
    # keys the JobSpec and its sections have, in either spelling, and some they do not
    def keys(descriptor: Any) -> list[str]:
        return [f.name for f in descriptor.fields] + [f.json_name for f in descriptor.fields] + ["nope"]

    section = data.draw(st.sampled_from(["", "training", "logging", "serving", "early_stopping"]))
    descriptor = getattr(pb.JobSpec(), section).DESCRIPTOR if section else pb.JobSpec.DESCRIPTOR
    inner = data.draw(st.dictionaries(st.sampled_from(keys(descriptor)), values, max_size=4))
    document = {section: inner} if section else inner
    assert fill(document, pb.JobSpec) == parse_dict(document, pb.JobSpec)


def test_a_nan_double_is_refused_as_json_format_refuses_it() -> None:
    document = {"threshold": math.nan}
    assert parse_dict(document, pb.JobSpec) == "ParseError"
    assert fill(document, pb.JobSpec) == "ParseError"


def test_a_message_type_with_a_struct_goes_to_json_format() -> None:
    document = {"seq": 3, "data": {"epoch": 1, "note": "x"}}
    assert fill(document, pb.JobEvent) == parse_dict(document, pb.JobEvent)
    assert isinstance(fill(document, pb.JobEvent), bytes)


@pytest.mark.parametrize(
    "document",
    [{"training": {"batch_size": 3, "batchSize": 4}}, {"model": {"weights_file": "a", "weightsFile": "b"}}],
    ids=["optional-field", "plain-field"],
)
def test_a_field_named_both_ways_gets_json_formats_answer(document: dict[str, Any]) -> None:
    # json_format keeps the last of a plain field's two names, and refuses both for an `optional` one
    assert fill(document, pb.JobSpec) == parse_dict(document, pb.JobSpec)
    assert parse_dict({"training": {"batch_size": 3, "batchSize": 4}}, pb.JobSpec) == "ParseError"
