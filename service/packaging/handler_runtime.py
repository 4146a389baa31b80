"""The code an archive carries, so that it serves where tuneserve is not installed.

TorchServe imports our handler from the unpacked archive; the handler needs `handlers.inference` and
the few `service` modules that rebuild the network and read its answers. Every archive ships exactly
those files (next to the handler, under their own package paths), and the handler puts its own folder
first on sys.path: an archive serves with the code it was packaged with, in the service's TorchServe
and in a plain one (KServe's), whatever tuneserve is installed there, if any. They import only torch,
torchvision, timm, Pillow and the standard library (tests/unit/test_handler_runtime.py checks both).
"""

from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path

from service.errors import FailedPrecondition

# What `import handlers.inference` loads of ours (the handler module itself goes in as the --handler).
RUNTIME_MODULES = (
    "handlers",
    "handlers.inference",
    "service",
    "service.errors",
    "service.tasks",
    "service.training",
    "service.training.architecture",
    "service.training.families",
    "service.training.heads",
    "service.training.registry",
    "service.training.transforms",
)


def stage_runtime(folder: Path) -> Path:
    """Copy the runtime's source files into `folder` under their package paths; returns `folder`."""
    for module in RUNTIME_MODULES:
        source = module_file(module)
        path = Path(*module.split("."))
        target = folder / (path / "__init__.py" if source.name == "__init__.py" else path.with_suffix(".py"))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return folder


def module_file(module: str) -> Path:
    """The source file of one of our modules, found without importing it (the service need not load torch)."""
    spec = find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise FailedPrecondition(f"the source of {module} is not installed; run `make setup`")
    return Path(spec.origin)
