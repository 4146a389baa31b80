"""tuneserve's TorchServe handler: the only module TorchServe imports from an archive.

TorchServe requires exactly one class here; the work is in handlers.inference, which the service
also runs in-process for the promotion gate. The archive carries handlers.inference and what it
imports (service.packaging.handler_runtime); `initialize` serves with that copy, so an archive answers
the same wherever it runs, with or without tuneserve installed (archives made before carry none and
use the installed one).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)

BATCH_METRIC = "TuneserveBatches"  # Prometheus counter per BatchSize label: dynamic batching, observable


class TuneserveHandler(BaseHandler):
    """Batch-aware image classifier; a bad request in a batch fails alone, with HTTP 400."""

    def initialize(self, context: Any) -> None:
        started = time.monotonic()
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        model_dir = Path(properties["model_dir"])
        if (model_dir / "handlers").is_dir() and str(model_dir) not in sys.path[:1]:
            sys.path.insert(0, str(model_dir))  # TorchServe puts $PYTHONPATH before the archive's folder
        from handlers.inference import ImageClassifier  # from the archive, once it is first on the path

        imported = time.monotonic()
        self.classifier = ImageClassifier.from_model_dir(model_dir, self.device)
        self.context = context
        self.initialized = True
        # the parts of a version's start that are ours (bench.service_run reads them): what remains of
        # a registration is TorchServe's (unpacking, the worker process, its own imports of torch)
        log.info(
            "loaded %s (%s, %d classes) on %s in %.3f s: imports %.3f s, build and weights %.3f s",
            self.classifier.config.model_config.get("architecture"),
            self.classifier.config.task,
            len(self.classifier.config.class_names),
            self.device,
            time.monotonic() - started,
            imported - started,
            time.monotonic() - imported,
        )

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        self.context = context
        self._record_batch(len(data), context)
        answers = self.classifier.handle(data)
        for i, answer in enumerate(answers):
            if isinstance(answer, dict) and "error" in answer:
                context.set_response_status(400, answer["error"][:200], i)
        return answers

    def _record_batch(self, size: int, context: Any) -> None:
        log.info("batch_size=%d", size)
        dimensions = [
            Dimension("ModelName", context.model_name),
            Dimension("Level", "Model"),
            Dimension("BatchSize", str(size)),
        ]
        context.metrics.add_counter(BATCH_METRIC, 1, None, dimensions)
