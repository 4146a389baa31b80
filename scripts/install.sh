#!/usr/bin/env bash
# Installs tuneserve into a virtual environment and generates its gRPC stubs.
# The Makefile (`make setup`) and the Docker image both run this script, so CI exercises the
# exact install path the container uses.
#   usage: scripts/install.sh VENV_DIR [EXTRAS]      e.g. scripts/install.sh .venv test,lint
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3.11}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
# Editable for development checkouts; the image installs a plain copy (TUNESERVE_EDITABLE=0).
if [ "${TUNESERVE_EDITABLE:-1}" = "1" ]; then
    "$venv/bin/pip" install --quiet -e "$spec"
    # The stubs land in the source tree, which an editable install imports from.
    "$venv/bin/python" "$root/scripts/gen_protos.py"
else
    "$venv/bin/pip" install --quiet "$spec"
    # protoc and TorchServe's jar (the stubs' sources) arrive with the dependencies, so the stubs are
    # generated after the first install; a plain copy holds only what was there when it was built, so
    # the package itself goes in once more, now with its stubs.
    "$venv/bin/python" "$root/scripts/gen_protos.py"
    "$venv/bin/pip" install --quiet --no-deps --force-reinstall "$root"
fi
