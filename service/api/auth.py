"""Authentication and the role check, in one interceptor; the caller travels on the call's context.

Every RPC but health needs `authorization: Bearer <token>` when the service has tokens (the shared
TUNESERVE_AUTH_TOKEN and/or the tokens file): a token no client has is UNAUTHENTICATED, a client whose
roles do not cover the RPC (service.access.policy) is PERMISSION_DENIED. A call let through reaches the
servicer with a context that carries the client (`caller(context)`); what the client may see is decided
by the domain (service.jobs.manager), which gets that client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from service.access.clients import ANONYMOUS, Client
from service.access.policy import refusal
from service.access.tokens_file import ClientDirectory
from service.api.interceptors import Behavior, rebuild

# Probes (Docker HEALTHCHECK, Kubernetes) must work without a secret.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class CallerContext:
    """The call's own context, with the authenticated client added (every other attribute is the call's)."""

    def __init__(self, context: grpc.ServicerContext, client: Client) -> None:
        self._context = context
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def caller(context: Any) -> Client:
    """The client the auth interceptor let through. Fails closed: a context without one is a wiring bug."""
    client = getattr(context, "client", None)
    if not isinstance(client, Client):
        raise RuntimeError("no authenticated client on this call's context; is AuthInterceptor installed?")
    return client


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticate (or, with no tokens at all, take everyone as ANONYMOUS), check the role, pass the
    client on."""

    def __init__(self, directory: ClientDirectory | None) -> None:
        self.directory = directory

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.directory is None:
            client: Client | None = ANONYMOUS
            problem = None
        else:
            header = dict(handler_call_details.invocation_metadata or ()).get("authorization")
            client, problem = self._authenticate(header)
        if client is None:
            reject = _refuse(grpc.StatusCode.UNAUTHENTICATED, str(problem))
            return rebuild(handler, reject, reject)
        denied = refusal(client, method)
        if denied is not None:
            reject = _refuse(grpc.StatusCode.PERMISSION_DENIED, denied)
            return rebuild(handler, reject, reject)
        known = client
        return rebuild(handler, lambda b: _with_client(b, known), lambda b: _with_client_stream(b, known))

    def _authenticate(self, header: Any) -> tuple[Client | None, str | None]:
        if not header:
            return None, (
                "missing `authorization: Bearer <token>` metadata; this server requires a client token "
                "(TUNESERVE_AUTH_TOKEN or one from its tokens file)"
            )
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "the authorization metadata must be `Bearer <token>`"
        assert self.directory is not None
        client = self.directory.authenticate(token.strip())
        if client is None:
            return None, "the bearer token is not valid for this server"
        return client, None


def _refuse(code: grpc.StatusCode, message: str) -> Callable[[Behavior], Behavior]:
    def reject(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return lambda _behavior: reject


def _with_client(behavior: Behavior, client: Client) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        return behavior(request, CallerContext(context, client))

    return call


def _with_client_stream(behavior: Behavior, client: Client) -> Behavior:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        yield from behavior(request, CallerContext(context, client))

    return call
