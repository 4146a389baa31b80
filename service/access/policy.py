"""Which role each RPC needs: the one table. The auth interceptor looks every call up here; an RPC missing
from it needs `admin` (a new RPC is closed until someone decides), and a test checks that every RPC of
the proto is listed.

`scope` says what a non-admin caller reaches: "own" - only its own jobs (others' answer NOT_FOUND, the same
as a job that does not exist), "all" - anything (models, architectures). Admins reach everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.access.clients import Client, Role


@dataclass(frozen=True)
class Rule:
    role: Role
    scope: str  # "own" or "all": documentation of what the domain enforces for non-admins


RULES: dict[str, Rule] = {
    # tuneserve.v1.FineTuning: jobs
    "CreateJob": Rule(Role.SUBMIT, "own"),  # the new job is the caller's; its max_queued/max_running hold
    "GetJob": Rule(Role.READ, "own"),
    "ListJobs": Rule(Role.READ, "own"),
    "WatchJob": Rule(Role.READ, "own"),
    "CancelJob": Rule(Role.SUBMIT, "own"),
    # architectures: nothing owned
    "ListModels": Rule(Role.READ, "all"),
    "DescribeModel": Rule(Role.READ, "all"),
    # serving
    "ListServedModels": Rule(Role.READ, "own"),  # models whose default version came from the caller's job
    "ServeJob": Rule(Role.SUBMIT, "own"),
    "ExportModel": Rule(Role.SUBMIT, "own"),
    # a model name is shared: these change what every client's Predict answers
    "UnserveModel": Rule(Role.ADMIN, "all"),
    "SetDefaultVersion": Rule(Role.ADMIN, "all"),
    # tuneserve.v1.Inference
    "Predict": Rule(Role.READ, "all"),
}
UNLISTED = Rule(Role.ADMIN, "all")  # any RPC added before this table is updated
REFLECTION = Rule(Role.READ, "all")  # grpcurl and friends: the API's shape, nothing of anyone's


def rule_for(method: str) -> Rule:
    """The rule for a full method path (`/tuneserve.v1.FineTuning/GetJob`)."""
    if method.startswith("/grpc.reflection."):
        return REFLECTION
    if method.startswith("/tuneserve.v1."):
        return RULES.get(method.rpartition("/")[2], UNLISTED)
    return UNLISTED


def refusal(client: Client, method: str) -> str | None:
    """Why `client` may not call `method`, or None when it may."""
    rule = rule_for(method)
    if client.may(rule.role):
        return None
    name = method.rpartition("/")[2]
    return (
        f"client {client.name} has roles {client.describe_roles()}; {name} needs {rule.role} "
        "(ask for it to be added in the tokens file)"
    )
