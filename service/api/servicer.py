"""The gRPC servicers: each RPC translates its request, calls the domain, translates the answer.

Errors are raised as domain errors and mapped to statuses by service.api.interceptors. The caller is the
client service.api.auth put on the context; the domain decides what that client may see.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from service.api import convert
from service.api.auth import caller
from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.api.gen.tuneserve.v1 import tuneserve_pb2_grpc as pb_grpc
from service.jobs.manager import JobManager
from service.jobs.serving_access import ClientServing, require_serving
from service.packaging.backend import ServingBackend
from service.settings import Settings
from service.training_imports import import_training_modules

# A layer table is built for real where the meta device cannot be used: bound the head it allocates.
MAX_DESCRIBED_CLASSES = 100_000


class FineTuningServicer(pb_grpc.FineTuningServicer):
    def __init__(self, settings: Settings, jobs: JobManager, serving: ServingBackend | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.serving = ClientServing(serving, jobs)

    def CreateJob(self, request: pb.CreateJobRequest, context: grpc.ServicerContext) -> pb.Job:
        spec = convert.spec_from_proto(request.spec)
        return convert.job_to_proto(self.jobs.create(spec, caller(context), request.idempotency_key or None))

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return convert.job_to_proto(self.jobs.get(request.job_id, caller(context)))

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        states = convert.states_from_proto(request.states)
        jobs, token = self.jobs.list(states, request.page_size, request.page_token, caller(context))
        return convert.list_jobs_to_proto(jobs, token)

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return convert.job_to_proto(self.jobs.cancel(request.job_id, caller(context)))

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        gone = threading.Event()
        context.add_callback(gone.set)  # the client went away (or the call ended): stop waiting
        for event, state in self.jobs.watch(request.job_id, request.after_seq, gone, caller(context)):
            yield convert.event_to_proto(event, state)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        import_training_modules()  # one thread at a time: see service.training_imports
        from service.training.registry import list_models

        models = list_models(request.source or None, self.settings.torch_home, request.available_only)
        return convert.models_to_proto(models)

    def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
    ) -> pb.ModelDescription:
        import_training_modules()
        from service.training.layers import describe_model

        description = describe_model(
            request.architecture,
            image_size=convert.optional_size(request.image_size, "image_size", 16, 1024),
            num_classes=convert.optional_size(request.num_classes, "num_classes", 1, MAX_DESCRIBED_CLASSES),
            freeze=convert.freeze_from_proto(request.freeze),
            torch_home=self.settings.torch_home,
        )
        return convert.description_to_proto(description)

    def ServeJob(self, request: pb.ServeJobRequest, context: grpc.ServicerContext) -> pb.ServedModel:
        return convert.served_model_to_proto(self.serving.serve_job(request.job_id, caller(context)))

    def UnserveModel(
        self, request: pb.UnserveModelRequest, context: grpc.ServicerContext
    ) -> pb.UnserveModelResponse:
        self.serving.backend().unserve(request.name, request.version or None)
        return pb.UnserveModelResponse()

    def SetDefaultVersion(
        self, request: pb.SetDefaultVersionRequest, context: grpc.ServicerContext
    ) -> pb.ServedModel:
        served = self.serving.backend().set_default(request.name, request.version)
        return convert.served_model_to_proto(served)

    def ListServedModels(
        self, request: pb.ListServedModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListServedModelsResponse:
        return convert.served_models_to_proto(self.serving.list_served(caller(context)))

    def ExportModel(
        self, request: pb.ExportModelRequest, context: grpc.ServicerContext
    ) -> pb.ExportModelResponse:
        exported = self.serving.export(convert.export_from_proto(request), caller(context))
        return convert.exported_to_proto(exported)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, serving: ServingBackend | None = None) -> None:
        self.serving = serving

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        result = require_serving(self.serving).predict(
            request.model, request.version or None, list(request.images), request.top_k or None
        )
        return convert.predict_to_proto(result)
