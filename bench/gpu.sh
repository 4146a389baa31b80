#!/usr/bin/env bash
# Benchmarks 1-3 on a GPU machine, in under 8 minutes, printing the same JSON lines as bench.run_all.
#
# The GPU machine has torch, torchvision, timm, grpcio and tensorboard, but no Java, TorchServe, wandb
# or pydantic. Benchmarks 1 and 2 drive the real training code, whose spec and settings types are
# pydantic models, so pydantic travels with the tree as wheels for that machine's Python (3.12):
#
#   here (has a package registry):   bench/gpu.sh --fetch        # wheels into build/gpu-wheels/
#   the device run:                  carry: build/gpu-wheels, service/api/gen
#                                    command: bench/gpu.sh
#
# On the device the wheels install into build/gpu-site (no network, no change to the system Python).
# Benchmark 3 needs the generated gRPC stubs (service/api/gen, carried) and the service's own
# dependencies; without TorchServe it measures submission to first training step only. A benchmark
# that cannot import what it needs prints {"benchmark": ..., "error": ...} and the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/gpu-wheels
SITE=build/gpu-site
PY=${PYTHON:-python3}
# what the training and service code imports beyond what the GPU machine has
PACKAGES=(pydantic pydantic-settings typer grpcio-health-checking==1.85.* grpcio-reflection==1.85.*)

if [[ "${1:-}" == "--fetch" ]]; then
    PIP=${PIP:-.venv/bin/pip}
    "$PIP" download --dest "$WHEELS" --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --implementation cp "${PACKAGES[@]}"
    exit 0
fi

if ! "$PY" -c "import pydantic, pydantic_settings" 2>/dev/null; then
    if [[ -d "$WHEELS" ]]; then
        # --no-deps for torch & co.: keep the machine's own; the wheels folder holds the rest
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" --no-deps "$WHEELS"/*.whl
        export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "pydantic is missing and $WHEELS is not here: run 'bench/gpu.sh --fetch' first and carry it" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('cuda', torch.cuda.is_available(), torch.__version__)" >&2
# 1 and 2 at GPU sizes (resnet50, batch 256); 3 with one small job and no TorchServe
exec timeout 470 "$PY" -m bench.run_all --no-torchserve --only loop_speed --only feature_cache --only job_latency
