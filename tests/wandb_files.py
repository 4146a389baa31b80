"""W&B's offline run files read back, as `wandb sync` would read them: what a run wrote, not what we think
it logged."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def read_wandb_records(run_dir: Path, keep_records: bool = False) -> dict[str, Any]:
    """history rows, summary and config from an offline run's `.wandb` file (a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, position, pending, records = path.read_bytes(), 7, b"", []  # 7-byte W&B header
    block = 32 * 1024
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))  # type: ignore[attr-defined]
    result: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
    if keep_records:
        result["records"] = records
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            item = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            result["history"].append(item)
        elif kind == "summary":
            for update in record.summary.update:
                result["summary"][update.key or "/".join(update.nested_key)] = json.loads(update.value_json)
        elif kind in ("run", "config"):
            config = record.run.config if kind == "run" else record.config
            result["config"].update({u.key: json.loads(u.value_json) for u in config.update})
    return result
