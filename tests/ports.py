"""Free loopback ports for the real servers the tests start (TorchServe needs five at once)."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now; all held open together so none repeats."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def torchserve_ports() -> dict[str, int]:
    """Settings fields for TorchServe's five ports, each free now: one TorchServe per test module."""
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    return {f"torchserve_{name}_port": port for name, port in zip(names, free_ports(5), strict=True)}
