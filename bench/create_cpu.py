"""Benchmark 12: CPU time of a CreateJob's own work in the service (admission, and the stored spec into
its response message) per call, against the same work done the earlier way in the same process.

Under 32 clients looping CreateJob -> CancelJob the service is held to one core by the GIL
(bench/control_plane.py), so every CPU millisecond a call costs is queueing for the others. Each round
takes new specs (a CreateJob's spec is new, so no per-spec cache helps) and measures the calling
thread's CPU (time.thread_time) for:
- `spec_message`: a validated spec's dict into a JobSpec message, by service.api.proto_fill against
  protobuf's json_format.ParseDict (which gives the same bytes);
- `admission`: service.jobs.admission.admit with the caches of what a weights choice implies, against
  the same with those caches cleared before each call.
Rounds alternate the two ways; the figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import emit, make_image_folder, ratio

NAME = "create_cpu"


def run(calls: int, rounds: int) -> dict[str, Any]:
    from google.protobuf import json_format

    from bench.control_plane import _spec
    from service.api import convert
    from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
    from service.api.proto_fill import message_from_dict
    from service.jobs.admission import admit
    from service.settings import Settings
    from service.training import layers, weights

    def clear_caches() -> None:
        layers._weights_shape.cache_clear()
        weights._weights_enum.cache_clear()

    with tempfile.TemporaryDirectory(prefix="bench-create-cpu-") as tmp:
        root = Path(tmp)
        make_image_folder(root / "data" / "ds", classes=2, per_class=4, size=32)
        settings = Settings(state_dir=root / "state", data_root=root / "data", torch_home=root / "torch")
        specs = [convert.spec_from_proto(_spec(pb, i)) for i in range(calls)]
        dicts = [convert._drop_none(spec.to_dict()) for spec in specs]
        assert all(  # the two ways agree before either is timed
            message_from_dict(d, pb.JobSpec()).SerializeToString(deterministic=True)
            == json_format.ParseDict(d, pb.JobSpec(), ignore_unknown_fields=True).SerializeToString(
                deterministic=True
            )
            for d in dicts
        )
        ways: dict[str, Callable[[int], Any]] = {
            "spec_message_json_format": lambda i: json_format.ParseDict(
                dicts[i], pb.JobSpec(), ignore_unknown_fields=True
            ),
            "spec_message_proto_fill": lambda i: message_from_dict(dicts[i], pb.JobSpec()),
            "admission_uncached": lambda i: (clear_caches(), admit(specs[i], settings)),
            "admission_cached": lambda i: admit(specs[i], settings),
        }
        for way in ways.values():  # warm: imports, the scan cache, the layer tables
            for i in range(min(20, calls)):
                way(i)
        seen: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, way in ways.items():
                began = time.thread_time()
                for i in range(calls):
                    way(i)
                seen[name].append((time.thread_time() - began) / calls * 1000)
    ms = {name: statistics.median(values) for name, values in seen.items()}
    return {
        "benchmark": NAME,
        "calls_per_round": calls,
        "rounds": rounds,
        "cpu_ms_per_call": {name: round(value, 4) for name, value in ms.items()},
        "spec_message_vs_json_format": round(
            ratio(ms["spec_message_proto_fill"], ms["spec_message_json_format"]), 3
        ),
        "admission_vs_uncached": round(ratio(ms["admission_cached"], ms["admission_uncached"]), 3),
        "saved_cpu_ms_per_create": round(
            ms["spec_message_json_format"]
            - ms["spec_message_proto_fill"]
            + ms["admission_uncached"]
            - ms["admission_cached"],
            4,
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    emit(run(200, 3) if args.quick else run(2000, 5))


if __name__ == "__main__":
    main()
