"""Which serving backend this service runs: the one place a new backend is plugged in.

The service process asks for `serving_backend` (service/app.py); a worker process, which has neither
the job store nor a running server, asks for `packager` to build a finished job's archive. TorchServe
is the only backend today, so both answer with it; a second one adds its module and a choice here.
"""

from __future__ import annotations

from service.packaging.backend import Packager, ServingBackend
from service.packaging.torchserve_backend import JobSource, TorchServeBackend
from service.settings import Settings


def serving_backend(settings: Settings, store: JobSource | None = None) -> ServingBackend:
    """The backend the service serves with, recording deploys on the jobs in `store`; not started."""
    return TorchServeBackend(settings, store)


def packager(settings: Settings) -> Packager:
    """What a worker packages a checkpoint with: `packager(settings).package(checkpoint, model_name)`."""
    return TorchServeBackend.packager(settings)
