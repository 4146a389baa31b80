"""A job spec from a YAML/JSON file, flags and `--set path=value` overrides, turned into the proto.

Only the shape is checked here (field names, scalar types), so a typo is named before anything is sent;
values and cross-field rules are the server's to check, in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.cli.client import CliError


def load_spec_file(path: Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml/.json file (JSON is YAML, so any suffix parses)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError("INVALID_ARGUMENT", f"spec file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CliError("INVALID_ARGUMENT", f"spec file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(
            "INVALID_ARGUMENT", f"spec file {path} must hold a mapping (name:, model:, data:, ...)"
        )
    return data


UNSET = object()  # an override that removes the field, so the server's default applies


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`data` with `overrides` (dotted paths -> values; None: not given; UNSET: remove) merged in."""
    merged = json.loads(json.dumps(data, default=str))  # a deep copy
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CliError("INVALID_ARGUMENT", f"spec.{dotted}: {part} is not a mapping (got {child!r})")
            node = child
        if value is UNSET:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return merged


def parse_set_options(options: list[str]) -> dict[str, Any]:
    """`--set training.lr=0.01` -> {"training.lr": 0.01}; values are YAML, `null` removes the field."""
    parsed: dict[str, Any] = {}
    for option in options:
        path, sep, raw = option.partition("=")
        if not sep or not path.strip():
            raise CliError(
                "INVALID_ARGUMENT", f"--set {option!r}: use PATH=VALUE, e.g. --set training.lr=0.01"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed[path.strip()] = UNSET if value is None else value
    return parsed


def spec_to_proto(data: dict[str, Any]) -> pb.JobSpec:
    """The proto JobSpec for a spec mapping; CliError naming the field when one is unknown or mistyped."""
    message = pb.JobSpec()
    _fill(message, data, "spec")
    return message


def _fill(message: Message, data: Any, where: str) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    if not isinstance(data, dict):
        raise CliError(
            "INVALID_ARGUMENT", f"{where}: expected a mapping of {', '.join(fields)} (got {data!r})"
        )
    for key, value in data.items():
        path = f"{where}.{key}"
        field = fields.get(str(key))
        if field is None:
            raise CliError("INVALID_ARGUMENT", f"{path}: unknown field; {where} has {', '.join(fields)}")
        if value is None:
            continue
        if field.message_type is not None:
            _fill(getattr(message, field.name), value, path)
        elif field.is_repeated:
            if not isinstance(value, list):
                value = [value]
            getattr(message, field.name).extend(
                _scalar(field, item, f"{path}[{i}]") for i, item in enumerate(value)
            )
        else:
            try:
                setattr(message, field.name, _scalar(field, value, path))
            except ValueError as exc:  # an integer out of the field's range
                raise CliError("INVALID_ARGUMENT", f"{path}: {exc} (got {value!r})") from None


def _scalar(field: FieldDescriptor, value: Any, path: str) -> Any:
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_STRING:
        if isinstance(value, dict | list):
            raise CliError("INVALID_ARGUMENT", f"{path}: expected a string (got {value!r})")
        return str(value).lower() if isinstance(value, bool) else str(value)
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise CliError("INVALID_ARGUMENT", f"{path}: expected true or false (got {value!r})")
        return value
    if kind in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CliError("INVALID_ARGUMENT", f"{path}: expected an integer (got {value!r})")
        return value
    if kind in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CliError("INVALID_ARGUMENT", f"{path}: expected a number (got {value!r})")
        return float(value)
    raise CliError("INVALID_ARGUMENT", f"{path}: unsupported field type")
