"""TorchServe's bearer keys: read from the key_file.json it writes, renewed before they expire.

With token authorization on, TorchServe writes a management, an inference and an API key into
key_file.json in its working directory; the first two expire (`expiration time`), and the API key asks
for fresh ones. `KeyRing` holds the current set for every caller (REST and gRPC clients, /ping) and
renews it a few minutes ahead of the expiry, so no request carries a key about to lapse.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service.errors import FailedPrecondition, Unavailable
from service.packaging.ts_config import management_url
from service.settings import Settings

KEY_RENEW_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True)
class TorchServeKeys:
    """Bearer keys from key_file.json; all empty when token authorization is off."""

    management: str = ""
    inference: str = ""
    api: str = ""
    expires_at: datetime | None = None

    def header(self, kind: str) -> dict[str, str]:
        key = self.management if kind == "management" else self.inference
        return {"Authorization": f"Bearer {key}"} if key else {}


class KeyRing:
    """The keys of one TorchServe (`key_file`: its key_file.json); safe to call from any thread."""

    def __init__(self, settings: Settings, key_file: Path) -> None:
        self.settings = settings
        self.key_file = key_file
        self._keys = TorchServeKeys()
        # apart from the process's own lock, so requests never wait behind a slow start
        self._lock = threading.RLock()

    @property
    def loaded(self) -> TorchServeKeys:
        """The keys as last read, without renewing them."""
        return self._keys

    def current(self) -> TorchServeKeys:
        """The current keys; renewed through the API key shortly before TorchServe expires them."""
        with self._lock:
            if not self.settings.torchserve_token_auth:
                return TorchServeKeys()
            expires = self._keys.expires_at
            if expires is not None and datetime.now(UTC) + KEY_RENEW_MARGIN >= expires:
                self.renew()
            return self._keys

    def renew(self) -> TorchServeKeys:
        """Ask TorchServe for fresh management and inference keys, then re-read key_file.json."""
        with self._lock:
            if not self.settings.torchserve_token_auth:
                return self._keys
            if self._keys.api:
                for kind in ("management", "inference"):
                    url = f"{management_url(self.settings)}/token?type={kind}"
                    request = urllib.request.Request(
                        url, headers={"Authorization": f"Bearer {self._keys.api}"}
                    )
                    try:
                        with urllib.request.urlopen(request, timeout=10):
                            pass
                    except (urllib.error.URLError, OSError) as exc:
                        raise Unavailable(f"TorchServe did not renew its {kind} key: {exc}") from None
            self._keys = self.read()
            return self._keys

    def load(self) -> None:
        """Read the keys TorchServe has just written; FailedPrecondition while it has not (or half)."""
        with self._lock:
            self._keys = self.read()

    def forget(self) -> None:
        """TorchServe stopped: its keys are dead, and so is the file that holds them."""
        with self._lock:
            self._keys = TorchServeKeys()
        self.key_file.unlink(missing_ok=True)  # dead keys, but keys all the same

    def read(self) -> TorchServeKeys:
        try:
            data = json.loads(self.key_file.read_text())
            expiries = [
                parse_key_expiry(data[kind]["expiration time"]) for kind in ("management", "inference")
            ]
            return TorchServeKeys(
                management=data["management"]["key"],
                inference=data["inference"]["key"],
                api=data["API"]["key"],
                expires_at=min(expiries),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FailedPrecondition(f"cannot read TorchServe's keys from {self.key_file}: {exc}") from None


def parse_key_expiry(text: str) -> datetime:
    # "2026-11-28T13:15:48.872250124Z": Java prints nanoseconds, Python parses microseconds
    head, _, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]:0<6}").replace(tzinfo=UTC)
