"""A STAND-IN for the Kubernetes API server, for tests only: no API server can be installed here.

An http.server on loopback that speaks just enough of the Kubernetes REST API for the official
`kubernetes` Python client to create, read, list (by label) and delete Kubeflow Trainer TrainJobs and
core Secrets in a namespace. Like the real API server it checks each body it is sent and answers with
`Status` objects: a TrainJob strictly against Kubeflow Trainer v2.3's CRD schema (tests/k8s_crds.py:
unknown fields refused), a Secret strictly against Kubernetes' own schema (kubernetes-validate
--strict), both refused with 422 Invalid naming the problems; a duplicate name is 409, a missing object
404. It runs no controller: tests set a TrainJob's status conditions themselves (`set_condition`), the
way the Trainer controller would, and nothing is garbage-collected (so a test sees every delete the
client made, with its propagationPolicy).

`refuse(status, verb, plural)` makes the next matching requests fail like an RBAC denial; its message
echoes the request body, as a careless proxy or webhook might, so tests can check that nothing the
client sent (a token) leaks into the error the caller sees.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
import yaml
from k8s_crds import errors as crd_errors

K8S_VERSION = "1.37.0"  # the Makefile's K8S_VERSION
_PATH = re.compile(
    r"^/(?:apis/(?P<group>[^/]+)/(?P<gversion>[^/]+)|api/(?P<core>v1))"
    r"/namespaces/(?P<ns>[^/]+)/(?P<plural>trainjobs|secrets)(?:/(?P<name>[^/]+))?$"
)
_KINDS = {"trainjobs": ("trainer.kubeflow.org", "v1alpha1", "TrainJob"), "secrets": ("", "v1", "Secret")}


@dataclass
class Request:
    method: str
    plural: str
    namespace: str
    name: str | None
    query: dict[str, list[str]]
    body: dict[str, Any] | None


@dataclass
class StandInApiServer:
    """Objects by (plural, namespace, name); every request in `requests`, in order."""

    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    refusals: list[tuple[int, str, str]] = field(default_factory=list)  # (status, verb, plural)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    # ------------------------------------------------------------------ what tests do

    def refuse(self, status: int, verb: str, plural: str) -> None:
        """Refuse every `verb` (create/get/list/delete) on `plural` with `status` from now on."""
        self.refusals.append((status, verb, plural))

    def set_condition(
        self, namespace: str, name: str, type_: str, reason: str = "", message: str = ""
    ) -> None:
        """What the Trainer controller would write: condition `type_` True on the TrainJob."""
        with self.lock:
            job = self.objects[("trainjobs", namespace, name)]
            conditions = job.setdefault("status", {}).setdefault("conditions", [])
            conditions.append(
                {
                    "type": type_,
                    "status": "True",
                    "reason": reason or type_,
                    "message": message,
                    "lastTransitionTime": "2026-12-02T12:00:00Z",
                }
            )

    def trainjobs(self, namespace: str) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {n: o for (p, ns, n), o in self.objects.items() if p == "trainjobs" and ns == namespace}

    def secrets(self, namespace: str) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {n: o for (p, ns, n), o in self.objects.items() if p == "secrets" and ns == namespace}

    def deletes(self, plural: str) -> list[Request]:
        return [r for r in self.requests if r.method == "DELETE" and r.plural == plural]

    # ------------------------------------------------------------------ the REST API

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        parsed = urlparse(path)
        match = _PATH.match(parsed.path)
        if match is None:
            return _status(404, "NotFound", f"the server could not find the requested resource {parsed.path}")
        plural, namespace, name = match["plural"], match["ns"], match["name"]
        group, version, kind = _KINDS[plural]
        if (match["group"] or "", match["gversion"] or match["core"]) != (group, version):
            return _status(404, "NotFound", f"no {plural} in {match['group']}/{match['gversion']}")
        request = Request(method, plural, namespace, name, parse_qs(parsed.query), body)
        self.requests.append(request)
        verb = {"POST": "create", "GET": "get" if name else "list", "DELETE": "delete"}[method]
        for status, refused_verb, refused_plural in self.refusals:
            if (refused_verb, refused_plural) == (verb, plural):
                echoed = json.dumps(body) if body is not None else ""
                return _status(
                    status,
                    "Forbidden",
                    f'{plural} is forbidden: User "system:serviceaccount:{namespace}:tuneserve" cannot '
                    f'{verb} resource "{plural}" in the namespace "{namespace}"; request was {echoed}',
                )
        with self.lock:
            if method == "POST":
                return self._create(plural, kind, namespace, body or {})
            if method == "GET" and name:
                found = self.objects.get((plural, namespace, name))
                return (200, found) if found else _not_found(plural, name)
            if method == "GET":
                return 200, self._list(plural, kind, namespace, request.query)
            if method == "DELETE" and name:
                if self.objects.pop((plural, namespace, name), None) is None:
                    return _not_found(plural, name)
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        return _status(405, "MethodNotAllowed", f"{method} is not supported here")

    def _create(
        self, plural: str, kind: str, namespace: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        problems = self._invalid(plural, namespace, body)
        name = body.get("metadata", {}).get("name", "")
        if problems:
            return _status(422, "Invalid", f'{kind} "{name}" is invalid: ' + "; ".join(problems))
        if (plural, namespace, name) in self.objects:
            return _status(409, "AlreadyExists", f'{plural} "{name}" already exists')
        created = json.loads(json.dumps(body))
        created["metadata"].update(
            uid=str(uuid.uuid4()), resourceVersion="1", creationTimestamp="2026-12-02T12:00:00Z"
        )
        self.objects[(plural, namespace, name)] = created
        return 201, created

    def _invalid(self, plural: str, namespace: str, body: dict[str, Any]) -> list[str]:
        metadata = body.get("metadata", {})
        problems = []
        if metadata.get("namespace", namespace) != namespace:
            problems.append(f"metadata.namespace {metadata.get('namespace')!r} does not match the request's")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", metadata.get("name", "")):
            problems.append(f"metadata.name {metadata.get('name')!r} is not a DNS-1035 label of at most 63")
        if plural == "trainjobs":
            problems += crd_errors(body)
        else:
            try:
                kubernetes_validate.validate(body, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(str(exc.message))
        return problems

    def _list(self, plural: str, kind: str, namespace: str, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = dict(pair.split("=", 1) for pair in query.get("labelSelector", [""])[0].split(",") if pair)
        items = [
            obj
            for (p, ns, _), obj in self.objects.items()
            if p == plural and ns == namespace and wanted.items() <= obj["metadata"].get("labels", {}).items()
        ]
        return {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {}, "items": items}


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                  "message": message}  # fmt: skip


def _not_found(plural: str, name: str) -> tuple[int, dict[str, Any]]:
    return _status(404, "NotFound", f'{plural} "{name}" not found')


@contextmanager
def running_standin() -> Iterator[StandInApiServer]:
    """The stand-in, serving on a free loopback port (its `url`) until the block ends."""
    api = StandInApiServer()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw.strip() else None
            status, payload = api.handle(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures anyway
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="k8s-standin", daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig at `path` whose current context is the stand-in at `url` (for KUBECONFIG)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": url}}],
        "users": [{"name": "tuneserve", "user": {"token": "standin-bearer"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "tuneserve"}}],
        "current-context": "standin",
    }
    path.write_text(yaml.safe_dump(config))
    return path
