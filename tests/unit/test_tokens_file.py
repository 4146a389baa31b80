"""The tokens file: what it accepts and refuses (naming the problem), constant-time lookup by digest, the
nesting of roles, and reloading when the file changes in place or behind a Kubernetes Secret's symlinks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from service.access.clients import ANONYMOUS, Client, Role
from service.access.policy import RULES, UNLISTED, rule_for
from service.access.tokens_file import ClientDirectory, TokensFileError, parse_tokens, token_sha256
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb


def entry(name: str, token: str, *roles: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "token_sha256": token_sha256(token), "roles": list(roles) or ["read"], **limits}


def write(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"clients": list(entries)}))
    return path


def test_a_client_is_found_by_its_token_and_only_by_it(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", entry("alice", "tok-a", "submit", max_queued=3), entry("bob", "tok-b"))
    directory = ClientDirectory(None, path)
    alice = directory.authenticate("tok-a")
    assert alice == Client("alice", frozenset({Role.SUBMIT}), max_queued=3)
    assert directory.authenticate("tok-b") is not None and directory.authenticate("tok-b").name == "bob"  # type: ignore[union-attr]
    assert directory.authenticate("tok-a ") is None
    assert directory.authenticate(token_sha256("tok-a")) is None  # the digest is not a token


def test_the_file_holds_digests_never_tokens(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", entry("alice", "secret-token-a", "submit"))
    assert "secret-token-a" not in path.read_text()


def test_a_client_with_two_digests_is_the_same_client_by_either_token(tmp_path: Path) -> None:
    """Rotation: the new token works before the old one is removed, and both are the same owner."""
    rotating = {**entry("alice", "old", "submit"), "token_sha256": [token_sha256("new"), token_sha256("old")]}
    directory = ClientDirectory(None, write(tmp_path / "t.json", rotating))
    assert directory.authenticate("old") == directory.authenticate("new") is not None


def test_the_shared_token_is_one_admin_client_next_to_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", entry("alice", "tok-a", "read"))
    directory = ClientDirectory("shared-token", path)
    shared = directory.authenticate("shared-token")
    assert shared is not None and shared.name == "admin" and shared.is_admin
    assert directory.authenticate("tok-a") is not None


def test_roles_nest_submit_reads_and_admin_does_everything() -> None:
    reader = Client("r", frozenset({Role.READ}))
    submitter = Client("s", frozenset({Role.SUBMIT}))
    admin = Client("a", frozenset({Role.ADMIN}))
    assert [reader.may(r) for r in Role] == [True, False, False]
    assert [submitter.may(r) for r in Role] == [True, True, False]
    assert [admin.may(r) for r in Role] == [True, True, True]
    assert submitter.sees("s") and not submitter.sees("r") and not submitter.sees(None)
    assert admin.sees("s") and admin.sees(None) and ANONYMOUS.sees("anyone")


BAD_FILES = {
    "not JSON": ("{clients: [", "is not JSON"),
    "an unknown role": (json.dumps({"clients": [entry("a", "t", "root")]}), "clients.0.roles.0"),
    "a token instead of its digest": (
        json.dumps({"clients": [{"name": "a", "token_sha256": "plain-token", "roles": ["read"]}]}),
        "token_sha256",
    ),
    "no roles": (json.dumps({"clients": [{**entry("a", "t"), "roles": []}]}), "clients.0.roles"),
    "an unknown field": (json.dumps({"clients": [{**entry("a", "t"), "token": "t"}]}), "clients.0.token"),
    "a negative limit": (json.dumps({"clients": [entry("a", "t", max_queued=-1)]}), "max_queued"),
    "a name twice": (json.dumps({"clients": [entry("a", "t1"), entry("a", "t2")]}), "'a' appears twice"),
    "one token for two clients": (
        json.dumps({"clients": [entry("a", "t"), entry("b", "t")]}),
        "listed already",
    ),
    "a digest twice in one client": (
        json.dumps({"clients": [{**entry("a", "t"), "token_sha256": [token_sha256("t")] * 2}]}),
        "listed already",
    ),
    "an empty list of digests": (
        json.dumps({"clients": [{**entry("a", "t"), "token_sha256": []}]}),
        "has no token_sha256",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_a_bad_file_is_refused_naming_the_file_and_the_problem(case: str) -> None:
    text, fragment = BAD_FILES[case]
    with pytest.raises(TokensFileError) as caught:
        parse_tokens(text, "/secrets/tokens.json")
    assert "/secrets/tokens.json" in caught.value.message and fragment in caught.value.message
    assert caught.value.code == "FAILED_PRECONDITION" and "\n" not in caught.value.message
    assert "plain-token" not in caught.value.message  # a token pasted as a digest is never echoed


def test_a_missing_file_at_start_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokensFileError, match="does not exist"):
        ClientDirectory(None, tmp_path / "absent.json")


def test_an_edit_in_place_is_picked_up_at_the_next_call(tmp_path: Path) -> None:
    path = write(tmp_path / "t.json", entry("alice", "tok-a"))
    directory = ClientDirectory(None, path)
    write(path, entry("alice", "tok-a2"), entry("carol", "tok-c", "admin"))
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert directory.authenticate("tok-a") is None
    assert directory.authenticate("tok-a2") is not None
    carol = directory.authenticate("tok-c")
    assert carol is not None and carol.is_admin


def swap_secret(mount: Path, version: str, *entries: dict[str, Any]) -> None:
    """What the kubelet does on a Secret update: write a new timestamped folder, then atomically repoint
    `..data` at it; `tokens.json` is a fixed symlink through `..data`."""
    folder = mount / version
    folder.mkdir()
    write(folder / "tokens.json", *entries)
    (mount / "..data_tmp").symlink_to(version)
    os.replace(mount / "..data_tmp", mount / "..data")
    if not (mount / "tokens.json").is_symlink():
        (mount / "tokens.json").symlink_to("..data/tokens.json")


def test_a_kubernetes_secret_update_swapping_the_symlink_is_picked_up(tmp_path: Path) -> None:
    swap_secret(tmp_path, "..2026_12_02_v1", entry("alice", "tok-a"))
    directory = ClientDirectory(None, tmp_path / "tokens.json")
    assert directory.authenticate("tok-a") is not None
    swap_secret(tmp_path, "..2026_12_02_v2", entry("bob", "tok-b"))
    assert directory.authenticate("tok-a") is None
    assert directory.authenticate("tok-b") is not None


def test_a_bad_file_on_reload_keeps_the_clients_there_were_and_logs_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "t.json", entry("alice", "tok-a"))
    directory = ClientDirectory(None, path)
    path.write_text('{"clients": [{"name": "alice"')  # a half-written file
    with caplog.at_level(logging.ERROR):
        assert directory.authenticate("tok-a") is not None
        assert directory.authenticate("tok-a") is not None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "is not JSON" in errors[0].getMessage()
    assert "keeping the 1 clients" in errors[0].getMessage()
    write(path, entry("alice", "tok-a"), entry("bob", "tok-b"))  # fixed: taken at once
    assert directory.authenticate("tok-b") is not None


def test_every_rpc_of_the_proto_is_in_the_table() -> None:
    rpcs = {m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert rpcs == set(RULES)


def test_an_rpc_missing_from_the_table_needs_admin() -> None:
    assert rule_for("/tuneserve.v1.FineTuning/DeleteEverything") == UNLISTED
    assert UNLISTED.role == Role.ADMIN
    assert rule_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").role == Role.READ
