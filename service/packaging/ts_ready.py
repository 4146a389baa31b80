"""Exact readiness for an exported folder's TorchServe: exit 0 only when every snapshot model answers.

The KServe runtime's container runs this as its exec readiness probe
(`python -m service.packaging.ts_ready --ts-config ... --key-file ...`, see kserve_manifests).
TorchServe 0.12 opens its inference port before the snapshot's worker has loaded the model (12.6 s
earlier on the 2-core dev machine, 58 s when it is busy), so a tcpSocket probe lets a pod take
traffic that waits in TorchServe's queue. This asks the management API (loopback only, the management key
from key_file.json when token authorization is on) whether every model version the config's
model_snapshot names has a READY worker, as the serving replica's readiness does
(service.packaging.serving_only.ServingReplica.health).

Standard library only and no tuneserve imports: it also runs as a plain file
(`python ts_ready.py ...`), and a probe every few seconds must not pay for importing torch.
Exit status: 0 ready, 1 not ready (why, on stderr: the kubelet records it in the pod's events).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"  # TorchServe's default management_address
TIMEOUT_S = 3.0  # below the probe's timeoutSeconds, so a hung TorchServe reads as "not ready"


class NotReady(Exception):
    """Why TorchServe cannot answer yet (the probe's message)."""


def read_properties(path: Path) -> dict[str, str]:
    """config.properties as export.render_config writes it: key=value lines, '\\\\' for a backslash."""
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        properties[key.strip()] = value.strip().replace("\\\\", "\\")
    return properties


def setting(properties: dict[str, str], name: str, default: str) -> str:
    """A property, overridden by its TS_<NAME> variable when enable_envvars_config=true (TorchServe's
    rule; KServe's runtime and the tests move ports that way)."""
    if properties.get("enable_envvars_config", "false").lower() == "true":
        from_env = os.environ.get(f"TS_{name.upper()}")
        if from_env:
            return from_env
    return properties.get(name, default)


def snapshot_versions(properties: dict[str, str]) -> list[tuple[str, str]]:
    """(model, version) for every version the model_snapshot loads at start."""
    try:
        models = json.loads(properties["model_snapshot"])["models"]
        return sorted((name, version) for name, versions in models.items() for version in versions)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise NotReady(f"the config has no readable model_snapshot ({exc!r}); nothing to wait for") from None


def management_url(properties: dict[str, str]) -> str:
    """The management address, reached on loopback (0.0.0.0 is where it listens, not an address)."""
    address = setting(properties, "management_address", DEFAULT_MANAGEMENT).rstrip("/")
    return address.replace("://0.0.0.0", "://127.0.0.1", 1)


def management_key(properties: dict[str, str], key_file: Path) -> str:
    """The management key, or "" when token authorization is off."""
    if setting(properties, "disable_token_authorization", "false").lower() == "true":
        return ""
    try:
        return str(json.loads(key_file.read_text())["management"]["key"])
    except FileNotFoundError:
        raise NotReady(f"no key file {key_file} yet (TorchServe writes it as it starts)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotReady(f"key file {key_file} has no management key ({exc!r})") from None


def worker_states(base_url: str, key: str, model: str, version: str) -> list[str]:
    """The status of each worker of one model version (GET /models/<model>/<version>)."""
    path = "/models/{}/{}".format(*(urllib.parse.quote(part, safe="") for part in (model, version)))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(base_url + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            described: Any = json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 404 while the snapshot is still registering it
        raise NotReady(f"{model} version {version}: TorchServe answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NotReady(f"TorchServe's management API at {base_url} is not answering ({reason})") from None
    except ValueError:
        raise NotReady(f"{model} version {version}: TorchServe's answer is not JSON") from None
    return [str(w.get("status", "")) for entry in described for w in entry.get("workers", [])]


def check(ts_config: Path, key_file: Path) -> list[str]:
    """One line per snapshot version, each with a READY worker; NotReady naming the first that has none."""
    try:
        properties = read_properties(ts_config)
    except OSError as exc:
        raise NotReady(f"cannot read {ts_config} ({exc.strerror})") from None
    versions = snapshot_versions(properties)
    base_url, key = management_url(properties), management_key(properties, key_file)
    lines = []
    for model, version in versions:
        states = worker_states(base_url, key, model, version)
        if "READY" not in states:
            raise NotReady(f"{model} version {version} has no READY worker (workers: {states or 'none'})")
        lines.append(f"{model} version {version}: {', '.join(states)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ts-config", type=Path, required=True, help="TorchServe's config.properties")
    parser.add_argument(
        "--key-file", type=Path, default=Path("key_file.json"),
        help="TorchServe's key_file.json (in its working directory)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        lines = check(args.ts_config, args.key_file)
    except NotReady as exc:
        sys.stderr.write(f"not ready: {exc}\n")
        return 1
    sys.stdout.write("ready: " + "; ".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
