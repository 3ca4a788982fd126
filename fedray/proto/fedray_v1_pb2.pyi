from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_VALIDATE: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_VALIDATE: TaskKind

class AssignRequest(_message.Message):
    __slots__ = ("name", "version", "previous_combiner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_COMBINER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    previous_combiner: str
    def __init__(self, name: str | None = ..., version: str | None = ..., previous_combiner: str | None = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("client_id", "combiner", "address")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMBINER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    combiner: str
    address: str
    def __init__(self, client_id: str | None = ..., combiner: str | None = ..., address: str | None = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "name", "version")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    name: str
    version: str
    def __init__(self, client_id: str | None = ..., name: str | None = ..., version: str | None = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "session_id", "round", "model_id", "model_size", "config", "deadline_unix")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: TaskKind
    session_id: str
    round: int
    model_id: str
    model_size: int
    config: _struct_pb2.Struct
    deadline_unix: float
    def __init__(self, task_id: str | None = ..., kind: TaskKind | str | None = ..., session_id: str | None = ..., round: int | None = ..., model_id: str | None = ..., model_size: int | None = ..., config: _struct_pb2.Struct | _Mapping | None = ..., deadline_unix: float | None = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "status")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    status: str
    def __init__(self, client_id: str | None = ..., status: str | None = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("interval_s", "known")
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    known: bool
    def __init__(self, interval_s: float | None = ..., known: bool | None = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("client_id", "model_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model_id: str
    def __init__(self, client_id: str | None = ..., model_id: str | None = ...) -> None: ...

class FetchPackageRequest(_message.Message):
    __slots__ = ("client_id", "sha256")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    sha256: str
    def __init__(self, client_id: str | None = ..., sha256: str | None = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "offset", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    def __init__(self, data: bytes | None = ..., offset: int | None = ..., total_size: int | None = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "task_id", "session_id", "round", "model_id", "num_examples", "metrics", "size", "sha256")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    task_id: str
    session_id: str
    round: int
    model_id: str
    num_examples: int
    metrics: _struct_pb2.Struct
    size: int
    sha256: str
    def __init__(self, client_id: str | None = ..., task_id: str | None = ..., session_id: str | None = ..., round: int | None = ..., model_id: str | None = ..., num_examples: int | None = ..., metrics: _struct_pb2.Struct | _Mapping | None = ..., size: int | None = ..., sha256: str | None = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: UpdateHeader | _Mapping | None = ..., chunk: Chunk | _Mapping | None = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: bool | None = ..., reason: str | None = ...) -> None: ...

class ValidationReport(_message.Message):
    __slots__ = ("client_id", "task_id", "session_id", "round", "model_id", "num_examples", "metrics")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    task_id: str
    session_id: str
    round: int
    model_id: str
    num_examples: int
    metrics: _struct_pb2.Struct
    def __init__(self, client_id: str | None = ..., task_id: str | None = ..., session_id: str | None = ..., round: int | None = ..., model_id: str | None = ..., num_examples: int | None = ..., metrics: _struct_pb2.Struct | _Mapping | None = ...) -> None: ...

class EventReport(_message.Message):
    __slots__ = ("client_id", "level", "message", "task_id", "data")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    level: str
    message: str
    task_id: str
    data: _struct_pb2.Struct
    def __init__(self, client_id: str | None = ..., level: str | None = ..., message: str | None = ..., task_id: str | None = ..., data: _struct_pb2.Struct | _Mapping | None = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
