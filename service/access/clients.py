"""The clients the service knows: a name, the SHA-256 of its bearer token, its roles and its job limits.

Roles nest: `read` (see one's own jobs, the models, predict), `submit` (read, plus create and cancel
one's own jobs, export them), `admin` (everything, everyone's jobs, the serving admin RPCs).
A job belongs to the client that created it; only that client and admins can see it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


# what each role grants, itself included: the nesting lives here and nowhere else
GRANTS: dict[Role, frozenset[Role]] = {
    Role.READ: frozenset({Role.READ}),
    Role.SUBMIT: frozenset({Role.READ, Role.SUBMIT}),
    Role.ADMIN: frozenset(Role),
}


@dataclass(frozen=True)
class Client:
    """An authenticated caller. `name` is what its jobs record as their owner."""

    name: str
    roles: frozenset[Role]
    max_queued: int | None = None
    max_running: int | None = None

    def may(self, role: Role) -> bool:
        return any(role in GRANTS[held] for held in self.roles)

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    def sees(self, owner: str | None) -> bool:
        """Whether a job (or version) owned by `owner` exists for this client."""
        return self.is_admin or owner == self.name

    def describe_roles(self) -> str:
        return ", ".join(sorted(self.roles)) or "none"


# Without any authentication configured (a local, single-user service) every caller is this one: it may
# do everything, and the jobs it creates have no owner (as before owners existed).
ANONYMOUS = Client(name="", roles=frozenset({Role.ADMIN}))
# TUNESERVE_AUTH_TOKEN, the one shared token from before per-client tokens: an admin client by this name
SHARED_TOKEN_CLIENT = "admin"
