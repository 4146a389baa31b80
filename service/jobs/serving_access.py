"""The serving RPCs that concern one job, seen by one client: serve or export only a job the client sees,
list only the models whose default version came from such a job. Another client's job is NOT_FOUND
here too, in the same words as a job that does not exist. Serving off is FAILED_PRECONDITION first, for
everyone alike (it says nothing about any job)."""

from __future__ import annotations

from typing import Any

from service.access.clients import Client
from service.errors import FailedPrecondition, NotFound
from service.jobs.manager import JobManager
from service.packaging.backend import ServingBackend
from service.serving_types import Exported, ExportRequest, ServedModel

SERVING_DISABLED = (
    "serving is disabled (TUNESERVE_TORCHSERVE_ENABLED=false); enable it and restart the service"
)


class ClientServing:
    """A serving backend (or None: serving is off) behind the job owners' rule."""

    def __init__(self, serving: ServingBackend | None, jobs: JobManager) -> None:
        self.serving = serving
        self.jobs = jobs

    def backend(self) -> ServingBackend:
        return require_serving(self.serving)

    def serve_job(self, job_id: str, caller: Client) -> ServedModel:
        backend = self.backend()
        self.jobs.get(job_id, caller)
        return backend.serve_job(job_id)

    def export(self, request: ExportRequest, caller: Client) -> Exported:
        backend = self.backend()
        self.jobs.get(request.job_id, caller)
        return backend.export(request)

    def list_served(self, caller: Client) -> list[ServedModel]:
        models = self.backend().list_served()
        if caller.is_admin:
            return models
        return [model for model in models if model.job_id and self._sees(model.job_id, caller)]

    def _sees(self, job_id: str, caller: Client) -> bool:
        try:
            self.jobs.get(job_id, caller)
        except NotFound:
            return False
        return True


def require_serving(serving: Any) -> ServingBackend:
    if serving is None:
        raise FailedPrecondition(SERVING_DISABLED)
    return serving  # type: ignore[no-any-return]
