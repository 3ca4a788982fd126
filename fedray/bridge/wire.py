"""Conversions between protobuf messages and fedray's own dataclasses, plus auth metadata.

Both sides of the bridge use this module, so it imports neither Ray nor pymongo.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.errors import UnknownTaskKind, UpdateRejected
from fedray.messages import StageReply, Task, TaskKind, UpdateHeader, ValidationReport
from fedray.text import printable

AUTH_HEADER = "authorization"
CLIENT_HEADER = "x-fedray-client"  # the name a client claims; keys its rate limit
# Trailing metadata of a Join stream a combiner ended to send the client elsewhere
# ("fedray-rejoin: rebalance"): the client pauses with jitter and asks the gateway again.
REJOIN_HEADER = "fedray-rejoin"

_KINDS = {TaskKind.TRAIN: pb.TASK_KIND_TRAIN, TaskKind.VALIDATE: pb.TASK_KIND_VALIDATE,
          TaskKind.STAGE: pb.TASK_KIND_STAGE}
_KINDS_BACK = {v: k for k, v in _KINDS.items()}


def auth_metadata(token: str | None, name: str = "") -> tuple[tuple[str, str], ...]:
    """The metadata of every call: the token, and the client's name when it is plain ASCII."""
    named = ((CLIENT_HEADER, name),) if name and name.isascii() and name.isprintable() else ()
    return (((AUTH_HEADER, f"Bearer {token}"),) if token else ()) + named


def to_struct(values: dict[str, Any] | None) -> struct_pb2.Struct:
    """A Struct from JSON-like values; non-finite floats become None (JSON has no NaN)."""
    struct = struct_pb2.Struct()
    struct.update(_jsonable(values or {}))
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    values = json_format.MessageToDict(struct)
    return {k: _whole(v) for k, v in values.items()}


MAX_CLIENT_VALUES = 64  # metrics (or event data) one client message may carry
MAX_KEY_CHARS = 128
MAX_TEXT_CHARS = 1024


def client_values(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Metrics or event data from a client, made safe to fold and to store.

    What a client sends is a flat mapping of names to finite numbers, booleans or short
    strings (without control characters); anything else (NaN and infinities, nested values,
    names that are empty, too long, start with ``$`` or hold a NUL byte, which tracking
    cannot store) is dropped.
    """
    values: dict[str, Any] = {}
    for key, value in struct.fields.items():
        if len(values) >= MAX_CLIENT_VALUES:
            break
        if not key or len(key) > MAX_KEY_CHARS or key.startswith("$") or "\x00" in key:
            continue
        kind = value.WhichOneof("kind")
        if kind == "number_value" and math.isfinite(value.number_value):
            values[key] = _whole(value.number_value)
        elif kind == "bool_value":
            values[key] = value.bool_value
        elif kind == "string_value":
            values[key] = printable(value.string_value[:MAX_TEXT_CHARS])
    return values


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
                   package_sha256=task.package_sha256, package_size=task.package_size,
                   stage=task.stage, payload=task.payload, client_half=task.client_half,
                   codec=task.codec, codec_options=to_struct(task.codec_options),
                   delta_from=task.delta_from, delta_size=task.delta_size)


def task_from_proto(msg: pb.Task) -> Task:
    """The task; ``UnknownTaskKind`` for a kind this side does not know (never a guess)."""
    kind = _KINDS_BACK.get(msg.kind)
    if kind is None:
        raise UnknownTaskKind(msg.kind, msg.task_id)
    return Task(task_id=msg.task_id, kind=kind, session_id=msg.session_id, round=msg.round,
                model_id=msg.model_id, model_size=msg.model_size,
                config=from_struct(msg.config), deadline_unix=msg.deadline_unix,
                package_sha256=msg.package_sha256, package_size=msg.package_size,
                stage=msg.stage or kind.value, payload=bytes(msg.payload),
                client_half=msg.client_half, codec=msg.codec,
                codec_options=from_struct(msg.codec_options), delta_from=msg.delta_from,
                delta_size=msg.delta_size)


MAX_ID_CHARS = 128  # task, session and model ids are 16-64 characters; nothing longer is kept


def _ids(msg: pb.UpdateHeader | pb.ValidationReport | pb.StageReply) -> None:
    """Refuse ids no combiner ever handed out, before they reach events or tables: a 4 MiB
    ``session_id`` would otherwise be copied into every rejection event."""
    for name in ("task_id", "session_id", "model_id"):
        if hasattr(msg, name) and len(getattr(msg, name)) > MAX_ID_CHARS:
            raise UpdateRejected("malformed", f"{name} is over {MAX_ID_CHARS} characters")
    if isinstance(msg, pb.StageReply) and len(msg.stage) > MAX_ID_CHARS:
        raise UpdateRejected("malformed", f"stage is over {MAX_ID_CHARS} characters")
    if isinstance(msg, pb.UpdateHeader) and len(msg.sha256) not in (0, 64):
        raise UpdateRejected("malformed", "sha256 must be 64 hex characters")


def header_from_proto(msg: pb.UpdateHeader, client_id: str) -> UpdateHeader:
    """The header of an update; UpdateRejected("malformed") for ids out of bounds."""
    _ids(msg)
    return UpdateHeader(client_id=client_id, task_id=msg.task_id, session_id=msg.session_id,
                        round=msg.round, model_id=msg.model_id, num_examples=msg.num_examples,
                        metrics=client_values(msg.metrics), size=msg.size, sha256=msg.sha256)


def validation_from_proto(msg: pb.ValidationReport, client_id: str) -> ValidationReport:
    _ids(msg)
    return ValidationReport(client_id=client_id, task_id=msg.task_id, session_id=msg.session_id,
                            round=msg.round, model_id=msg.model_id, num_examples=msg.num_examples,
                            metrics=client_values(msg.metrics))


def stage_reply_from_proto(msg: pb.StageReply, client_id: str) -> StageReply:
    _ids(msg)
    return StageReply(client_id=client_id, task_id=msg.task_id, session_id=msg.session_id,
                      round=msg.round, stage=msg.stage, payload=bytes(msg.payload))
