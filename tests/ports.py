"""Free loopback ports for the real servers the tests start (TorchServe needs five at once).

Not `bind(("127.0.0.1", 0))`: the kernel answers that from its ephemeral range, the range every
outgoing connection takes its local port from, so between our check and the server's own bind any
client on this machine (the other xdist worker's gRPC calls, TorchServe's, PostgreSQL's) may take the
port, and the server fails to start (CI saw it: "Failed to bind to address 127.0.0.1:44337", the demo's
gRPC port). Ports below that range are only ever taken by a listener that names them, so they come
from there: each xdist worker from its own slice, and one process never hands out a port twice.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

LOWEST = 10_000  # above the well-known and registered ports most daemons are configured on
FALLBACK_EPHEMERAL_START = 32_768  # Linux's default when /proc cannot be read

if __name__ != "tests.ports":
    # imported twice under two names, the two copies would hand out the same ports
    raise ImportError(f"import this module as tests.ports, not {__name__}")


def ephemeral_start() -> int:
    """The first port the kernel uses for outgoing connections (net.ipv4.ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_EPHEMERAL_START


def worker_slice() -> range:
    """This xdist worker's share of [LOWEST, the ephemeral range): disjoint from every other worker's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    top = max(ephemeral_start(), LOWEST + 1_000)
    width = (top - LOWEST) // max(workers, 1)
    start = LOWEST + (index % max(workers, 1)) * width
    return range(start, start + width)


_lock = threading.Lock()
# Where in its slice this process hands out next. Each process starts at a point set by its pid, so a
# test's subprocess that picks ports too is unlikely to walk the same ports as its parent.
_next = [os.getpid() % 997]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """The first of `count` consecutive ports, each free on 127.0.0.1 now and not handed out before."""
    ports = worker_slice()
    with _lock:
        for _ in range(len(ports)):
            base = ports[0] + _next[0] % (len(ports) - count)
            if all(_bindable(base + i) for i in range(count)):
                _next[0] += count
                return base
            _next[0] += 1
    raise RuntimeError(f"no {count} consecutive free ports left in {ports}")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now, outside the kernel's ephemeral range."""
    base = free_port_block(count)
    return list(range(base, base + count))


def torchserve_ports() -> dict[str, int]:
    """Settings fields for TorchServe's five ports, each free now: one TorchServe per test module."""
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    return {f"torchserve_{name}_port": port for name, port in zip(names, free_ports(5), strict=True)}
