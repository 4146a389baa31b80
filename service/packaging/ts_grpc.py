"""TorchServe's gRPC inference API, through stubs generated from its own jar (service.packaging.ts_gen).

This adapter is the only place that speaks gRPC to TorchServe; it hands back decoded answers and
raises domain errors, so the rest of the service never sees a grpc status.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from service.errors import FailedPrecondition, NotFound, TuneserveError, Unavailable
from service.packaging.ts_keys import TorchServeKeys

PREDICT_TIMEOUT_S = 60.0


class TorchServeGrpc:
    """Predictions over TorchServe's gRPC inference port, one RPC per image so TorchServe can batch them."""

    def __init__(
        self,
        target: str,
        keys: Callable[[], TorchServeKeys],
        renew_keys: Callable[[], TorchServeKeys] | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        try:  # generated at install time by scripts/gen_protos.py
            from service.packaging.ts_gen import inference_pb2, inference_pb2_grpc
        except ImportError:
            raise FailedPrecondition(
                "TorchServe's gRPC stubs are missing; run `make proto` to generate them"
            ) from None
        self._messages = inference_pb2
        self.target = target
        self.keys = keys
        self.renew_keys = renew_keys
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def predict(
        self, model: str, version: str | None, images: Sequence[bytes], top_k: int | None
    ) -> list[Any]:
        """TorchServe's decoded JSON answer per image, in order (a list of scores, or {"error": ...})."""
        try:
            return self._predict_all(model, version, images, top_k)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.PERMISSION_DENIED or self.renew_keys is None:
                raise _domain_error(exc, model) from None
        self.renew_keys()  # TorchServe expired or rotated its keys: renew once
        try:
            return self._predict_all(model, version, images, top_k)
        except grpc.RpcError as exc:
            raise _domain_error(exc, model) from None

    def _predict_all(
        self, model: str, version: str | None, images: Sequence[bytes], top_k: int | None
    ) -> list[Any]:
        metadata = [(k.lower(), v) for k, v in self.keys().header("inference").items()]
        futures = []
        for image in images:
            inputs = {"data": image, **({"top_k": str(top_k).encode()} if top_k else {})}
            request = self._messages.PredictionsRequest(
                model_name=model, model_version=version or "", input=inputs
            )
            futures.append(
                self._stub.Predictions.future(request, metadata=metadata, timeout=PREDICT_TIMEOUT_S)
            )
        return [json.loads(future.result().prediction) for future in futures]


def _domain_error(exc: grpc.RpcError, model: str) -> TuneserveError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INTERNAL and (
        "ModelNotFoundException" in details or "Model not found" in details
    ):
        return NotFound(f"TorchServe has no model {model!r} (or not that version): {details.splitlines()[0]}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return Unavailable("TorchServe rejected the service's inference key; it may have been restarted")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"TorchServe did not answer within {PREDICT_TIMEOUT_S:.0f} s for model {model!r}")
    first_line = details.splitlines()[0] if details else code.name
    return Unavailable(f"TorchServe could not predict with model {model!r}: {first_line}")
