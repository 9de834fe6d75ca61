"""`dvd-healthcheck`: exit 0 when a DvD service is healthy (for container health checks).

    dvd-healthcheck --http http://127.0.0.1:8000/health    # language service
    dvd-healthcheck --grpc 127.0.0.1:50051                 # vision service (grpc.health.v1)
    dvd-healthcheck                                        # whichever of the two runs here

No curl or grpc_health_probe binary is needed in the image: this uses the project's own
dependencies.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

DEFAULT_HTTP = "http://127.0.0.1:8000/health"
DEFAULT_GRPC = "127.0.0.1:50051"


def http_healthy(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (local URL)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def grpc_healthy(target: str, timeout: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dvd-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--http", help="URL of the language service's /health")
    parser.add_argument("--grpc", help="host:port of the vision service")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.http:
        healthy = http_healthy(args.http, args.timeout)
    elif args.grpc:
        healthy = grpc_healthy(args.grpc, args.timeout)
    else:
        healthy = http_healthy(DEFAULT_HTTP, args.timeout) or grpc_healthy(
            DEFAULT_GRPC, args.timeout
        )
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
