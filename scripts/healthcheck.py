"""Exit 0 when tuneserve's gRPC health service reports SERVING, 1 otherwise (the image's HEALTHCHECK).

Reads the same TUNESERVE_* variables as the service: the port, and the TLS certificate when TLS is on
(trusted as the root, since it is usually self-signed; TUNESERVE_HEALTHCHECK_SERVER_NAME names a host
it holds, default localhost). Health needs no auth token. mTLS is not
supported: with TUNESERVE_TLS_CLIENT_CA set, probe over a plaintext sidecar or at the load balancer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def open_channel(address: str, tls_cert: str | None, server_name: str) -> grpc.Channel:
    if not tls_cert:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_cert).read_bytes())
    # The certificate names the public host, not the loopback address the check dials.
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", server_name)])


def check(address: str, service: str, timeout: float, tls_cert: str | None, server_name: str) -> int:
    """Ask the health service about `service`; print why when it is not SERVING."""
    with open_channel(address, tls_cert, server_name) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"unhealthy: {address} {service!r}: {error.code().name} {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {address} {service!r}: {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--address", default=f"127.0.0.1:{env.get('TUNESERVE_PORT', '50051')}")
    parser.add_argument("--service", default="", help='"" is the whole server; or tuneserve.v1.FineTuning')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--tls-cert", default=env.get("TUNESERVE_TLS_CERT"), help="trusted root (PEM)")
    parser.add_argument(
        "--server-name",
        default=env.get("TUNESERVE_HEALTHCHECK_SERVER_NAME", "localhost"),
        help="a host name the TLS certificate holds",
    )
    args = parser.parse_args(argv)
    return check(args.address, args.service, args.timeout, args.tls_cert, args.server_name)


if __name__ == "__main__":
    sys.exit(main())
