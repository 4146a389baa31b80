"""The tokens file (TUNESERVE_AUTH_TOKENS_FILE): the clients, read at start and again when it changes.

JSON, one object:

    {"clients": [
      {"name": "alice", "token_sha256": "<64 hex digits>", "roles": ["submit"], "max_queued": 3},
      {"name": "ci", "token_sha256": ["<new token's digest>", "<old token's digest>"], "roles": ["admin"]}
    ]}

A list of digests lets a client hold two tokens while it rotates: same name, so the same jobs.

Only SHA-256 digests are stored, never a token. A bearer token is hashed and compared with every
client's digest in constant time. The file is checked on each call by (inode, mtime, size): a Kubernetes
Secret update swaps a symlink, which changes the inode the path resolves to, and an edit in place changes
the mtime. A file that does not parse at start stops the service; on a reload the old clients stay and
the problem is logged once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from service.access.clients import SHARED_TOKEN_CLIENT, Client, Role
from service.errors import FailedPrecondition

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class TokensFileError(FailedPrecondition):
    """The tokens file cannot be used; the message names the file, the problem and the fix. At start it
    stops the service (`tuneserve serve` prints it as one `error:` line and exits non-zero)."""


DIGEST = re.compile(r"[0-9a-fA-F]{64}")


class _ClientEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    token_sha256: str | list[str]  # checked by parse_tokens, which names a bad digest plainly
    roles: list[Role] = Field(min_length=1)
    max_queued: int | None = Field(None, ge=0)
    max_running: int | None = Field(None, ge=0)


class _TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: list[_ClientEntry]


def token_sha256(token: str) -> str:
    """The digest a tokens file stores for `token` (what `printf %s TOKEN | sha256sum` prints)."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, source: str) -> list[tuple[bytes, Client]]:
    """(digest, client) for every client in the file's text; TokensFileError naming what is wrong."""
    try:
        parsed = _TokensFile.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise TokensFileError(
            f"tokens file {source} is not JSON ({exc}); see the README's tokens file format"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        # a union's member ("str", "list[str]") is not a place in the file: leave it out of the path
        where = ".".join(str(p) for p in first["loc"] if p not in ("str", "list[str]"))
        # what was there, except where it may be a secret pasted in the wrong place
        got = "" if "token_sha256" in where else f" (got {first.get('input')!r})"
        raise TokensFileError(
            f"tokens file {source}: {where}: {first['msg']}{got}; each client needs "
            "name, token_sha256 (64 hex digits, or a list of them), roles from "
            f"{[r.value for r in Role]}, and optional max_queued / max_running (0 or more)"
        ) from None
    seen_names: set[str] = set()
    seen_digests: set[str] = set()
    entries = []
    for entry in parsed.clients:
        digests = [entry.token_sha256] if isinstance(entry.token_sha256, str) else entry.token_sha256
        if not digests:
            raise TokensFileError(f"tokens file {source}: client {entry.name!r} has no token_sha256")
        for digest in digests:
            if not DIGEST.fullmatch(digest):
                raise TokensFileError(
                    f"tokens file {source}: client {entry.name!r}: a token_sha256 is not a SHA-256 digest "
                    "(64 hex digits; not shown, it may be a token); store `printf %s TOKEN | sha256sum`, "
                    "never the token"
                )
        if entry.name in seen_names:
            raise TokensFileError(
                f"tokens file {source}: client name {entry.name!r} appears twice; names are unique"
            )
        seen_names.add(entry.name)
        client = Client(entry.name, frozenset(entry.roles), entry.max_queued, entry.max_running)
        for digest in (d.lower() for d in digests):
            if digest in seen_digests:
                raise TokensFileError(
                    f"tokens file {source}: client {entry.name!r} has a token_sha256 listed already (for it "
                    "or another client); give each client its own tokens"
                )
            seen_digests.add(digest)
            entries.append((bytes.fromhex(digest), client))
    return entries


class ClientDirectory:
    """Token -> client, from the shared token and/or the tokens file, reloaded when the file changes."""

    def __init__(self, shared_token: str | None = None, tokens_file: Path | None = None) -> None:
        shared = Client(SHARED_TOKEN_CLIENT, frozenset({Role.ADMIN}))
        self._shared = [(hashlib.sha256(shared_token.encode()).digest(), shared)] if shared_token else []
        self._path = tokens_file
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._refused: tuple[int, int, int] | None = None  # a bad version already logged
        self._entries: list[tuple[bytes, Client]] = []
        if tokens_file is not None:
            stamp = self._stat()
            if stamp is None:
                raise TokensFileError(
                    f"tokens file {tokens_file} (TUNESERVE_AUTH_TOKENS_FILE) does not exist or cannot be "
                    "read; create it or unset the variable"
                )
            self._entries = self._read()
            self._stamp = stamp
            log.info("tokens file %s: %d clients", tokens_file, len(self._entries))

    def authenticate(self, token: str) -> Client | None:
        """The client whose token this is, or None. Every digest is compared, whichever matches."""
        self.refresh()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, client in self._shared + self._entries:
            if hmac.compare_digest(digest, known) and found is None:
                found = client
        return found

    def refresh(self) -> None:
        """Read the file again if it changed; keep the clients there are when the new file is bad."""
        if self._path is None:
            return
        stamp = self._stat()
        if stamp is None or stamp == self._stamp or stamp == self._refused:
            return
        with self._lock:
            if stamp in (self._stamp, self._refused):
                return
            try:
                entries = self._read()
            except TokensFileError as exc:
                self._refused = stamp
                log.error("%s; keeping the %d clients loaded before", exc, len(self._entries))
                return
            self._entries, self._stamp = entries, stamp
            log.info("tokens file %s reloaded: %d clients", self._path, len(entries))

    def _stat(self) -> tuple[int, int, int] | None:
        assert self._path is not None
        try:
            st = os.stat(self._path)  # follows the Secret's symlinks to the file behind them
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> list[tuple[bytes, Client]]:
        assert self._path is not None
        try:
            text = self._path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokensFileError(f"tokens file {self._path} cannot be read ({exc})") from None
        return parse_tokens(text, str(self._path))
