"""service.packaging.ts_ready's reading of an exported config.properties (as export.render_config writes
it), and its answers when TorchServe is not there. Its answers against a real TorchServe, loading and
then serving, are in tests/integration/test_export_readiness.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.packaging import ts_ready
from service.packaging.export import Batching, render_config
from service.serving_types import Archive, ExportRequest

ARCHIVE = Archive(path=Path("/x/pets.mar"), sha256="0" * 64, name="pets", version="3")


def exported_config(tmp_path: Path, *, token_auth: bool = True) -> Path:
    path = tmp_path / "config.properties"
    request = ExportRequest(job_id="job-1", target=tmp_path / "out", token_auth=token_auth)
    path.write_text(render_config(ARCHIVE, request, Batching()))
    return path


def test_the_snapshot_and_the_management_address_come_from_the_exported_config(tmp_path: Path):
    properties = ts_ready.read_properties(exported_config(tmp_path))
    assert ts_ready.snapshot_versions(properties) == [("pets", "3")]
    assert ts_ready.management_url(properties) == "http://127.0.0.1:8081"


def test_ts_variables_move_the_address_when_the_config_allows(tmp_path: Path, monkeypatch):
    properties = ts_ready.read_properties(exported_config(tmp_path))
    monkeypatch.setenv("TS_MANAGEMENT_ADDRESS", "http://0.0.0.0:9081")
    assert ts_ready.management_url(properties) == "http://127.0.0.1:9081"  # loopback, not 0.0.0.0
    properties["enable_envvars_config"] = "false"
    assert ts_ready.management_url(properties) == "http://127.0.0.1:8081"


def test_the_management_key_is_read_only_under_token_authorization(tmp_path: Path):
    key_file = tmp_path / "key_file.json"
    with_auth = ts_ready.read_properties(exported_config(tmp_path))
    with pytest.raises(ts_ready.NotReady, match="no key file"):
        ts_ready.management_key(with_auth, key_file)
    key_file.write_text(json.dumps({"management": {"key": "m-key"}, "inference": {"key": "i-key"}}))
    assert ts_ready.management_key(with_auth, key_file) == "m-key"
    (tmp_path / "off").mkdir()
    without = ts_ready.read_properties(exported_config(tmp_path / "off", token_auth=False))
    assert ts_ready.management_key(without, tmp_path / "absent.json") == ""


def test_a_config_without_a_snapshot_is_never_ready(tmp_path: Path):
    (tmp_path / "c.properties").write_text("inference_address=http://0.0.0.0:8085\n")
    with pytest.raises(ts_ready.NotReady, match="model_snapshot"):
        ts_ready.snapshot_versions(ts_ready.read_properties(tmp_path / "c.properties"))


def test_the_command_exits_1_naming_why_when_nothing_answers(tmp_path: Path):
    config = exported_config(tmp_path, token_auth=False)
    # a port nothing listens on: bind one, note it, close it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config.write_text(config.read_text().replace("127.0.0.1:8081", f"127.0.0.1:{port}"))
    done = subprocess.run(
        [sys.executable, ts_ready.__file__, f"--ts-config={config}"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 1
    assert f"127.0.0.1:{port} is not answering" in done.stderr
    missing = subprocess.run(
        [sys.executable, ts_ready.__file__, f"--ts-config={tmp_path / 'absent'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1 and "cannot read" in missing.stderr
