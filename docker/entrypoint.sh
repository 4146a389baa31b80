#!/bin/sh
# Starts tuneserve: the container's entrypoint, and the same script on a host (CI's end-to-end test).
#   TUNESERVE_VENV=.venv docker/entrypoint.sh        extra arguments go to `tuneserve serve`
# Values already set always win. `exec` makes the service the process that receives SIGTERM (from tini
# in the image), so it drains: no new jobs, the running job checkpoints, TorchServe stops.
set -eu

if [ -n "${TUNESERVE_VENV:-}" ]; then
    PATH="$TUNESERVE_VENV/bin:$PATH"
    export PATH
fi

# In the image (TUNESERVE_CONTAINER=1, set by the Dockerfile): the volumes, and listen on all interfaces
# so published ports reach the API, TorchServe's inference and metrics, and TensorBoard. TorchServe's
# management API stays on loopback (TUNESERVE_TORCHSERVE_HOST): only the service registers models.
# On a host the settings' own defaults (loopback everywhere) hold.
if [ "${TUNESERVE_CONTAINER:-0}" = 1 ]; then
    : "${TUNESERVE_HOST:=0.0.0.0}" "${TUNESERVE_TENSORBOARD_HOST:=0.0.0.0}"
    : "${TUNESERVE_TORCHSERVE_INFERENCE_HOST:=0.0.0.0}"
    : "${TUNESERVE_STATE_DIR:=/state}" "${TUNESERVE_DATA_ROOT:=/data}"
    export TUNESERVE_HOST TUNESERVE_TENSORBOARD_HOST TUNESERVE_TORCHSERVE_INFERENCE_HOST \
        TUNESERVE_STATE_DIR TUNESERVE_DATA_ROOT
fi

die() {
    echo "tuneserve entrypoint: $*" >&2
    exit 1
}

case "${TUNESERVE_AUTH_TOKEN:-}" in
    REPLACE-ME*) die "TUNESERVE_AUTH_TOKEN is still the placeholder: set a long random token (openssl rand -hex 32)" ;;
esac

command -v tuneserve >/dev/null 2>&1 \
    || die "tuneserve not found on PATH: run 'make setup' and set TUNESERVE_VENV=.venv (or activate the venv)"

# TorchServe's frontend needs Java 17 or newer.
case "$(printf %s "${TUNESERVE_TORCHSERVE_ENABLED:-true}" | tr '[:upper:]' '[:lower:]')" in
    0 | f | false | n | no | off) ;;
    *)
        command -v java >/dev/null 2>&1 \
            || die "java not found: TorchServe needs a JRE 17 (apt-get install openjdk-17-jre-headless), or set TUNESERVE_TORCHSERVE_ENABLED=false"
        java_major=$(java -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n 1)
        [ "${java_major:-0}" -ge 17 ] \
            || die "java ${java_major:-?} found, TorchServe needs 17 or newer (openjdk-17-jre-headless)"
        ;;
esac

exec tuneserve serve "$@"
