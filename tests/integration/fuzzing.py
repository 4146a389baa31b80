"""Hypothesis strategies for tuneserve's requests, derived from the proto descriptors.

Every RPC of both services is found in the descriptor, so a new RPC or field is fuzzed without
touching the tests. Values lean towards the ones that break services: empty, huge, negative, NaN,
unicode, path tricks, and the valid choices (so some requests get past the first check).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import strategies as st

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb

Code = grpc.StatusCode
FD = d.FieldDescriptor

# What each RPC may answer to a request it cannot use (OK included: some random requests are fine).
# A method not listed here (a new RPC) is held to CLIENT_ERRORS.
CLIENT_ERRORS = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.ALREADY_EXISTS,
        Code.RESOURCE_EXHAUSTED,
        Code.OUT_OF_RANGE,
        Code.UNAVAILABLE,
    }
)
_SERVING_OFF = frozenset(
    {Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT}
)  # the fuzzed server has no TorchServe
ALLOWED: dict[str, frozenset[Code]] = {
    "CreateJob": frozenset(
        {
            Code.OK,
            Code.INVALID_ARGUMENT,
            Code.FAILED_PRECONDITION,
            Code.ALREADY_EXISTS,
            Code.RESOURCE_EXHAUSTED,
        }
    ),
    "GetJob": frozenset({Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT}),
    "ListJobs": frozenset({Code.OK, Code.INVALID_ARGUMENT}),
    "CancelJob": frozenset({Code.OK, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT}),
    "WatchJob": frozenset({Code.OK, Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}),
    "ListModels": frozenset({Code.OK, Code.INVALID_ARGUMENT}),
    "DescribeModel": frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION}),
    "ServeJob": _SERVING_OFF,
    "UnserveModel": _SERVING_OFF,
    "SetDefaultVersion": _SERVING_OFF,
    "ListServedModels": _SERVING_OFF,
    "Predict": _SERVING_OFF,
}


@dataclass(frozen=True)
class Method:
    """One RPC as the descriptor describes it."""

    service: str  # tuneserve.v1.FineTuning
    name: str  # CreateJob
    request: type[Any]  # the generated request class
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def allowed(self) -> frozenset[Code]:
        return ALLOWED.get(self.name, CLIENT_ERRORS)

    def __repr__(self) -> str:  # hypothesis shows this in a falsifying example
        return self.path


def all_methods() -> list[Method]:
    """Every RPC of every service in tuneserve.proto."""
    return [
        Method(
            service.full_name,
            method.name,
            message_factory.GetMessageClass(method.input_type),
            method.server_streaming,
        )
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


# ---------------------------------------------------------------------- values

_PATH_TRICKS = ["..", "../..", "../../etc", "/etc/passwd", "ds/../..", "ds/./class_0", "~", "/", "\\..\\"]
_CHOICES = [
    # valid values of the choice fields, so some requests pass one check and reach the next
    "multiclass", "binary", "multilabel", "resnet18", "mobilenet_v3_small", "timm/convnext_atto",
    "efficientnet_lite0", "DEFAULT", "none", "file", "IMAGENET1K_V1", "adamw", "sgd", "cosine", "onecycle",
    "light", "standard", "auto", "cpu", "cuda", "fp16", "bf16", "val_loss", "val_accuracy", "min", "max",
    "eval", "train", "offline", "disabled", "torchvision", "timm", "builtin", "ds", "features.0", "layer1",
]  # fmt: skip
_ODD = [
    "",
    " ",
    "\x00",
    "\t\n",
    "é",
    "名前",
    "🙂" * 50,
    "\u202e",
    "a" * 5000,
    "%s%n",
    "'; DROP TABLE jobs;--",
]

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def text() -> st.SearchStrategy[str]:
    """Any unicode, path tricks, the valid choices, and a few classics."""
    return st.one_of(
        st.text(max_size=80),
        st.sampled_from(_CHOICES + _PATH_TRICKS + _ODD),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8).map(lambda s: f"timm/{s}"),
    )


def page_tokens() -> st.SearchStrategy[str]:
    """Tokens shaped like ours (`v1:<num>`, base64) with any number, and anything else."""
    shaped = st.integers(-(2**70), 2**70).map(
        lambda n: base64.urlsafe_b64encode(f"v1:{n}".encode()).decode().rstrip("=")
    )
    return st.one_of(shaped, text())


def integers(low_high: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = low_high
    return st.one_of(
        st.integers(-3, 70), st.sampled_from([low, high, low + 1, high - 1]), st.integers(low, high)
    )


def scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    """A random value of the field's type (any number an enum's wire type can hold, too)."""
    kind = field.type
    if kind == FD.TYPE_STRING:
        return page_tokens() if field.name == "page_token" else text()
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=256)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == FD.TYPE_DOUBLE else 32)
    if kind == FD.TYPE_ENUM:
        return integers(INT32)  # open enums: unknown numbers arrive as they are
    if kind in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return integers(INT64)
    if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    return integers(INT32)


@st.composite
def messages(draw: st.DrawFn, cls: type[Any], depth: int = 0) -> Any:
    """A message of `cls` with a random subset of its fields set to random values, nested messages too."""
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FD.TYPE_MESSAGE:
            sub = field.message_type
            if depth >= 4 or sub.GetOptions().map_entry or sub.full_name.startswith("google.protobuf."):
                continue  # requests hold no maps or well-known types today
            sub_cls = message_factory.GetMessageClass(sub)
            if field.is_repeated:
                getattr(message, field.name).extend(draw(st.lists(messages(sub_cls, depth + 1), max_size=3)))
            else:
                getattr(message, field.name).CopyFrom(draw(messages(sub_cls, depth + 1)))
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=5)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


def leaf_fields(cls: type[Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, field descriptor) of every scalar field of `cls`, nested ones included."""
    leaves: list[tuple[tuple[str, ...], Any]] = []
    for field in cls.DESCRIPTOR.fields:
        if field.type == FD.TYPE_MESSAGE:
            if not field.message_type.full_name.startswith("google.protobuf."):
                leaves += leaf_fields(
                    message_factory.GetMessageClass(field.message_type), (*prefix, field.name)
                )
        else:
            leaves.append(((*prefix, field.name), field))
    return leaves


@st.composite
def mutated(draw: st.DrawFn, base: Any, max_changes: int = 3) -> Any:
    """`base` (a valid message) with 1..max_changes scalar fields set to random values."""
    message = type(base)()
    message.CopyFrom(base)
    leaves = leaf_fields(type(base))
    for path, field in draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=max_changes)):
        holder = message
        for name in path[:-1]:
            holder = getattr(holder, name)
        if field.is_repeated:
            repeated = getattr(holder, path[-1])
            del repeated[:]
            repeated.extend(draw(st.lists(scalar(field), max_size=5)))
        else:
            setattr(holder, path[-1], draw(scalar(field)))
    return message
