"""A client for TorchServe's REST APIs (management, and inference for the gate), with the bearer keys.

TorchServe's answers become domain errors: not reachable -> Unavailable, unknown model -> NotFound,
a version that exists -> AlreadyExists. A refused key is renewed once before giving up.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.errors import AlreadyExists, InvalidArgument, NotFound, TuneserveError, Unavailable
from service.packaging.ts_keys import TorchServeKeys

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 300.0
# how often wait_ready asks: registration no longer waits for the worker, so this is the delay it adds
# (bench.latency: 0.02-0.03 s from the handler's "loaded" to the gate); then less often, up to the max
READY_POLL_S = 0.025
READY_POLL_GROWTH = 1.5
READY_POLL_MAX_S = 0.5


@dataclass(frozen=True)
class VersionInfo:
    """One registered version of a model, as TorchServe describes it."""

    name: str
    version: str
    archive: str
    batch_size: int
    max_batch_delay_ms: int
    worker_states: tuple[str, ...]  # READY, UNLOADING, ... one per worker
    # (worker id, process id or -1 before it has one), one per worker: a worker that dies while
    # loading keeps its id and TorchServe starts a new process for it
    worker_pids: tuple[tuple[str, int], ...] = ()

    @property
    def ready(self) -> bool:
        return "READY" in self.worker_states


class RestClient:
    """Authorised JSON requests to one TorchServe port, with TorchServe's errors as domain errors."""

    def __init__(
        self,
        base_url: str,
        key_kind: str,
        keys: Callable[[], TorchServeKeys],
        renew_keys: Callable[[], TorchServeKeys] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key_kind = key_kind
        self.keys = keys
        self.renew_keys = renew_keys
        self.timeout_s = timeout_s

    def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """The decoded JSON answer (or text, when it is not JSON)."""
        url = self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        for attempt in (1, 2):
            headers = self.keys().header(self.key_kind)
            if content_type:
                headers["Content-Type"] = content_type
            request = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                    return _decode(response.read())
            except urllib.error.HTTPError as exc:
                answer = _decode(exc.read())
                kind = answer.get("type", "") if isinstance(answer, dict) else ""
                if kind == "InvalidKeyException" and attempt == 1 and self.renew_keys is not None:
                    self.renew_keys()
                    continue
                raise _domain_error(exc.code, kind, answer, f"{method} {path}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise Unavailable(
                    f"TorchServe is not reachable at {self.base_url} ({reason}); it may be (re)starting"
                ) from None
        raise AssertionError("unreachable")


class ManagementClient:
    """TorchServe's management API: register, describe, set the default version, unregister."""

    def __init__(self, rest: RestClient) -> None:
        self.rest = rest

    def register(
        self, archive: str, model_name: str, *, batch_size: int, max_batch_delay_ms: int, workers: int
    ) -> None:
        """Register an archive of the model store as a version of model_name; returns once TorchServe
        has the version, its workers starting (wait_ready waits for one).

        Never `synchronous=true`: TorchServe then waits for the workers on one of the Netty threads
        that serve every port, and every request on a connection that thread owns (one connection in
        four with ts_config's NETTY_THREADS; inference too) hangs until the version has loaded
        (bench/deploy_stall.py measures predictions of another model during a load, both ways)."""
        query = {
            "url": archive,
            "model_name": model_name,
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay_ms,
            "initial_workers": workers,
            "synchronous": "false",
        }
        self.rest.call("POST", "/models", query=query, timeout_s=REGISTER_TIMEOUT_S)

    def describe(self, model_name: str, version: str | None = None) -> list[VersionInfo]:
        """Every version of a model (or one); NotFound when there is none."""
        path = f"/models/{_quote(model_name)}/{_quote(version) if version else 'all'}"
        return [_version_info(entry) for entry in self.rest.call("GET", path)]

    def set_default(self, model_name: str, version: str) -> None:
        self.rest.call("PUT", f"/models/{_quote(model_name)}/{_quote(version)}/set-default")

    def unregister(self, model_name: str, version: str) -> None:
        self.rest.call("DELETE", f"/models/{_quote(model_name)}/{_quote(version)}", timeout_s=120)

    def unregister_quietly(self, model_name: str, version: str) -> bool:
        """Unregister, logging instead of raising: True when the version is gone (or never was there),
        False when TorchServe could not remove it (the error is logged; the caller may try again)."""
        try:
            self.unregister(model_name, version)
        except NotFound:
            return True
        except Exception:
            log.exception("could not unregister %s version %s", model_name, version)
            return False
        return True

    def wait_ready(self, model_name: str, version: str, timeout_s: float) -> VersionInfo:
        """Poll until a worker of the version is READY; Unavailable when its workers keep dying while
        they load (LoadWatch: TorchServe would retry them for ever) or after timeout_s."""
        deadline = time.monotonic() + timeout_s
        watch = LoadWatch()
        pause = READY_POLL_S
        while True:
            (info,) = self.describe(model_name, version)
            if info.ready:
                return info
            if (processes := watch.died_too_often(info)) is not None:
                raise Unavailable(
                    f"model {model_name} version {version} did not load: its worker died while loading "
                    f"{len(processes) - 1} times (processes {', '.join(map(str, processes))}); see "
                    "TorchServe's model_log.log"
                )
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"model {model_name} version {version} has no ready worker after {timeout_s:.0f} s "
                    f"(workers: {', '.join(info.worker_states) or 'none'}); see TorchServe's model_log.log"
                )
            time.sleep(pause)
            # soon after a quick load, seldom during a long one: on a GPU host each describe makes
            # TorchServe run nvidia-smi per worker on a thread that also serves predictions
            pause = min(pause * READY_POLL_GROWTH, READY_POLL_MAX_S)


class LoadWatch:
    """Whether a version's workers keep dying while they load, from successive describes.

    TorchServe starts a new process for a worker that died, under the same worker id. One restart is
    forgiven: it need not be the handler's fault (the warm-worker zygote's death takes its children
    with it, and TorchServe restarts them cold). A second one is the handler's, and it fails."""

    FORGIVEN = 1

    def __init__(self) -> None:
        self._processes: dict[str, list[int]] = {}  # worker id -> its processes, in order

    def died_too_often(self, info: VersionInfo) -> list[int] | None:
        """A worker's processes so far, when it has died more often than forgiven; else None."""
        for worker, pid in info.worker_pids:
            if pid <= 0:  # not started yet
                continue
            processes = self._processes.setdefault(worker, [])
            if not processes or processes[-1] != pid:
                processes.append(pid)
            if len(processes) - 1 > self.FORGIVEN:
                return processes
        return None


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _version_info(entry: dict[str, Any]) -> VersionInfo:
    return VersionInfo(
        name=entry["modelName"],
        version=entry["modelVersion"],
        archive=entry.get("modelUrl", ""),
        batch_size=int(entry.get("batchSize", 1)),
        max_batch_delay_ms=int(entry.get("maxBatchDelay", 0)),
        worker_states=tuple(w.get("status", "") for w in entry.get("workers", [])),
        worker_pids=tuple((str(w.get("id", "")), int(w.get("pid", -1))) for w in entry.get("workers", [])),
    )


def _domain_error(status: int, kind: str, answer: Any, what: str) -> TuneserveError:
    # TorchServe's own errors carry "message"; our handler's per-request refusals carry "error"
    fields = answer if isinstance(answer, dict) else {"message": str(answer)}
    message = fields.get("message") or fields.get("error") or ""
    text = f"TorchServe refused {what}: {message or status}"
    if kind == "InvalidKeyException":
        return Unavailable(f"{text}; the service's TorchServe keys were rejected (was TorchServe restarted?)")
    if status == 404:
        return NotFound(text)
    if status == 409:
        return AlreadyExists(text)
    if status == 400:
        return InvalidArgument(text)
    return Unavailable(text)
