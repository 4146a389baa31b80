"""A throw-away PKI for tests, made with the `openssl` CLI (the `cryptography` package is not installed):
a CA, and a server certificate it signs for the names a loopback client dials."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """(key, certificate) of a self-signed CA called `name`."""
    key, cert = folder / f"{name}-ca.key", folder / f"{name}-ca.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
            "-days", "1", "-subj", f"/CN={name} test CA")  # fmt: skip
    return key, cert


def make_server_cert(folder: Path, ca: tuple[Path, Path], name: str = "server") -> tuple[Path, Path]:
    """(key, certificate) for localhost and 127.0.0.1, signed by `ca`."""
    key, csr, cert, ext = (folder / f"{name}.{s}" for s in ("key", "csr", "pem", "ext"))
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=tuneserve-reporting")  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
            "-out", str(cert), "-days", "1", "-extfile", str(ext))  # fmt: skip
    return key, cert


def make_pki(folder: Path) -> dict[str, Path]:
    """Our CA, a server certificate it signed (key, cert), and another CA with a server certificate of its
    own (other_key, other_cert): what a client trusting our CA must refuse, or a renewal under a new CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, other_ca = make_ca(folder, "ours"), make_ca(folder, "other")
    key, cert = make_server_cert(folder, ca)
    other_key, other_cert = make_server_cert(folder, other_ca, "other-server")
    return {
        "ca": ca[1], "key": key, "cert": cert,
        "other_ca": other_ca[1], "other_key": other_key, "other_cert": other_cert,
    }  # fmt: skip
