"""The training modules the control plane imports lazily, imported by one thread at a time.

The service process imports torch, torchvision and timm only when a job is admitted or a model listed
or described, and a thread imports them ahead at start (service.app). Two threads that enter
torchvision's import cycle through different modules at once can deadlock inside Python's import
system, which breaks the tie by handing one of them a partially initialised module: a CreateJob racing
the start-up import failed with "partially initialized module 'torchvision.models' has no attribute
'list_models'" (INTERNAL), once in ~25 starts on the 2-core dev machine. Behind one lock the imports
never interleave; once done, asking again costs a flag check.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_done = threading.Event()


def import_training_modules() -> None:
    """Import what admission, ListModels and DescribeModel use; a second thread waits for the first.
    A failed import raises here, and the next caller tries again."""
    if _done.is_set():
        return
    with _lock:
        if _done.is_set():
            return
        import service.training.data_root
        import service.training.layers
        import service.training.registry
        import service.training.scan
        import service.training.scan_cache
        import service.training.weights  # noqa: F401

        _done.set()
