#!/usr/bin/env bash
# Builds the CPU image with Debian's podman where no Docker engine runs and no base image can be pulled,
# then runs it: serves health, drains on SIGTERM. docker/README.md says what this proves and what not.
#   docker/podman-build.sh [IMAGE]        (make podman-build; needs root, podman, mmdebstrap)
# Only PyPI and Debian are reachable here, so by default no weights are baked (WEIGHTS) and torch comes
# from PyPI, not the CPU wheel index (CPU_TORCH_INDEX); set either where their hosts are reachable.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
image=${1:-tuneserve:cpu}
base=localhost/tuneserve-base:bookworm
run_opts=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

if ! podman image exists "$base"; then
    # Stands in for python:3.11-slim-bookworm: Debian bookworm's own python3 is 3.11. It trusts this
    # machine's extra CAs (a TLS-inspecting proxy), and its pip uses them, as the host's pip does.
    # shellcheck disable=SC2016  # mmdebstrap expands "$1" (the new root) in each hook
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        --customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share' \
        --customize-hook='chroot "$1" update-ca-certificates' \
        --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" >"$1/etc/pip.conf"' \
        bookworm - | podman import - "$base"
fi

# --format docker keeps HEALTHCHECK (the OCI format has no such field), so the check below runs the
# image's own. --ignorefile: buildah reads only the context's .dockerignore, not BuildKit's
# Dockerfile.dockerignore. UV_IMAGE and GPU_BASE name the stand-in too, so nothing is ever pulled.
podman build --isolation=chroot --network=host --format docker -f "$root/docker/Dockerfile" \
    --ignorefile "$root/docker/Dockerfile.dockerignore" \
    --build-arg VARIANT=cpu --build-arg CPU_BASE="$base" --build-arg GPU_BASE="$base" --build-arg UV_IMAGE="$base" \
    --build-arg CPU_TORCH_INDEX="${CPU_TORCH_INDEX:-}" --build-arg WEIGHTS="${WEIGHTS:-}" \
    -t "$image" "$root"

echo "== image: user, tools, package, no compilers"
podman run --rm "${run_opts[@]}" --entrypoint /bin/sh "$image" -c \
    'id -u && tini --version && java -version 2>&1 | head -n 1 \
     && python -c "import sys, service, ts, torch; print(sys.version.split()[0], torch.__version__)" \
     && for tool in gcc cc make; do if command -v "$tool"; then echo "build tool $tool in the image"; exit 1; fi; done'

echo "== run: health, then SIGTERM"
name=tuneserve-podman-check
podman rm -f "$name" >/dev/null 2>&1 || true
# Read-only root with HOME=/tmp, as docker/k8s/deployment.yaml runs it.
podman run -d --name "$name" "${run_opts[@]}" --read-only -e HOME=/tmp -e TUNESERVE_AUTH_TOKEN=podman-check \
    "$image" >/dev/null
trap 'podman rm -f "$name" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 60); do
    # The image's HEALTHCHECK command (scripts/healthcheck.py, the gRPC health service).
    if podman healthcheck run "$name" >/dev/null 2>&1; then
        healthy=1
        break
    fi
    [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || break
    sleep 3
done
if [ -z "${healthy:-}" ]; then
    podman logs "$name" | tail -n 30
    echo "podman-build: the container never reported SERVING" >&2
    exit 1
fi
start=$(date +%s)
podman stop -t 300 "$name" >/dev/null
status=$(podman inspect -f '{{.State.ExitCode}}' "$name")
echo "healthy; SIGTERM -> exit $status after $(($(date +%s) - start)) s"
[ "$status" = 0 ]
