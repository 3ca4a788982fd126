"""Conversions between protobuf messages and fedray's own dataclasses, plus auth metadata.

Both sides of the bridge use this module, so it imports neither Ray nor pymongo.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from fedray.actors.messages import Task, TaskKind, UpdateHeader, ValidationReport
from fedray.proto import fedray_v1_pb2 as pb

AUTH_HEADER = "authorization"

_KINDS = {TaskKind.TRAIN: pb.TASK_KIND_TRAIN, TaskKind.VALIDATE: pb.TASK_KIND_VALIDATE}
_KINDS_BACK = {v: k for k, v in _KINDS.items()}


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def to_struct(values: dict[str, Any] | None) -> struct_pb2.Struct:
    """A Struct from JSON-like values; non-finite floats become None (JSON has no NaN)."""
    struct = struct_pb2.Struct()
    struct.update(_jsonable(values or {}))
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    values = json_format.MessageToDict(struct)
    return {k: _whole(v) for k, v in values.items()}


def _whole(value: Any) -> Any:
    # Struct stores every number as a double; give back ints where they were ints.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)


def task_to_proto(task: Task) -> pb.Task:
    return pb.Task(task_id=task.task_id, kind=_KINDS[task.kind], session_id=task.session_id,
                   round=task.round, model_id=task.model_id, model_size=task.model_size,
                   config=to_struct(task.config), deadline_unix=task.deadline_unix,
                   package_sha256=task.package_sha256)


def task_from_proto(msg: pb.Task) -> Task:
    return Task(task_id=msg.task_id, kind=_KINDS_BACK.get(msg.kind, TaskKind.TRAIN),
                session_id=msg.session_id, round=msg.round, model_id=msg.model_id,
                model_size=msg.model_size, config=from_struct(msg.config),
                deadline_unix=msg.deadline_unix, package_sha256=msg.package_sha256)


def header_from_proto(msg: pb.UpdateHeader, client_id: str) -> UpdateHeader:
    return UpdateHeader(client_id=client_id, task_id=msg.task_id, session_id=msg.session_id,
                        round=msg.round, model_id=msg.model_id, num_examples=msg.num_examples,
                        metrics=from_struct(msg.metrics), size=msg.size, sha256=msg.sha256)


def validation_from_proto(msg: pb.ValidationReport, client_id: str) -> ValidationReport:
    return ValidationReport(client_id=client_id, task_id=msg.task_id, session_id=msg.session_id,
                            round=msg.round, model_id=msg.model_id, num_examples=msg.num_examples,
                            metrics=from_struct(msg.metrics))
