"""Server TLS credentials that follow their files: a renewed certificate is served without a restart.

cert-manager renews a certificate at two thirds of its life and the kubelet swaps the mounted Secret's
files in place (a symlink flip). gRPC asks the fetcher before every new connection's handshake; it
answers None (keep the current pair) unless a file changed since it was last read, so connections made
after a renewal get the new certificate and open ones keep theirs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CERT_SETTING = "TUNESERVE_REPORT_TLS_CERT"
KEY_SETTING = "TUNESERVE_REPORT_TLS_KEY"


class ReloadingCertificate:
    """A certificate and key read from `cert` and `key`, read again whenever either file changes."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._seen = self._stamp()
        self.initial = self._read()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: None to keep serving the current pair, else the pair now on disk."""
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            configuration = self._read()
        except ValueError as exc:  # mid-swap or gone: keep serving what works, say so
            log.warning("reporting API certificate not reloaded, the current one stays: %s", exc)
            return None
        self._seen = stamp
        log.info("reporting API certificate reloaded from %s", self.cert)
        return configuration

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for setting, path in ((CERT_SETTING, self.cert), (KEY_SETTING, self.key)):
            try:
                status = os.stat(path)  # follows the Secret volume's symlinks to the current file
            except OSError as exc:
                raise ValueError(
                    f"{setting} {path}: cannot be read ({exc.strerror}); give a readable PEM file"
                ) from None
            stamps.append((status.st_ino, status.st_mtime_ns, status.st_size))
        return tuple(stamps)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        pem = {}
        for setting, path in ((CERT_SETTING, self.cert), (KEY_SETTING, self.key)):
            try:
                pem[setting] = path.read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"{setting} {path}: cannot be read ({exc.strerror}); give a readable PEM file"
                ) from None
        return grpc.ssl_server_certificate_configuration([(pem[KEY_SETTING], pem[CERT_SETTING])])
