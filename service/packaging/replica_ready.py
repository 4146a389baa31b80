"""A serving replica's readiness endpoint: GET /ready is 200 only when it can answer predictions.

TorchServe's own /ping says Healthy as soon as it runs, before the replica has registered its models
(it registers them through the management API once TorchServe is up, which takes a worker start and
a model load, tens of seconds): a load balancer that trusted /ping alone would send a new replica
requests it answers with 404 for that long. /ready asks /ping and, for every model the replica
serves, whether its default version has a READY worker; it answers 200 with the checks when all pass,
503 with them otherwise. Kubernetes' readiness probe asks it (docker/k8s/serving-deployment.yaml).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from service.errors import FailedPrecondition

log = logging.getLogger(__name__)

Probe = Callable[[], dict[str, bool]]


class ReadinessServer:
    """GET /ready on host:port (port 0: any free one), in a daemon thread."""

    def __init__(self, host: str, port: int, probe: Probe) -> None:
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(probe))
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot listen for readiness on {host}:{port} ({exc.strerror}); free the port or give "
                "another with --ready-port"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="replica-ready", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("readiness: GET http://%s:%d/ready", self._server.server_address[0], self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(probe: Probe) -> type[BaseHTTPRequestHandler]:
    class ReadyHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server dispatches on this name
            if self.path != "/ready":
                self._answer(404, {"error": f"no {self.path}; ask GET /ready"})
                return
            try:
                checks = probe()
            except Exception:  # a probe that fails says "not ready", never crashes the endpoint
                log.exception("readiness probe failed")
                checks = {}
            ready = bool(checks) and all(checks.values())
            self._answer(200 if ready else 503, {"ready": ready, "checks": checks})

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, sort_keys=True).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("readiness %s", format % args)  # a probe every few seconds: not worth INFO

    return ReadyHandler
