from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_VALIDATE: _ClassVar[TaskKind]
    TASK_KIND_STAGE: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_VALIDATE: TaskKind
TASK_KIND_STAGE: TaskKind

class AssignRequest(_message.Message):
    __slots__ = ("name", "version", "previous_combiner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_COMBINER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    previous_combiner: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., previous_combiner: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("client_id", "combiner", "address")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMBINER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    combiner: str
    address: str
    def __init__(self, client_id: _Optional[str] = ..., combiner: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "name", "version", "attrs")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    name: str
    version: str
    attrs: _containers.ScalarMap[str, str]
    def __init__(self, client_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., attrs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "session_id", "round", "model_id", "model_size", "config", "deadline_unix", "package_sha256", "package_size", "stage", "payload", "client_half", "codec", "codec_options", "delta_from", "delta_size")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HALF_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FROM_FIELD_NUMBER: _ClassVar[int]
    DELTA_SIZE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: TaskKind
    session_id: str
    round: int
    model_id: str
    model_size: int
    config: _struct_pb2.Struct
    deadline_unix: float
    package_sha256: str
    package_size: int
    stage: str
    payload: bytes
    client_half: str
    codec: str
    codec_options: _struct_pb2.Struct
    delta_from: str
    delta_size: int
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., session_id: _Optional[str] = ..., round: _Optional[int] = ..., model_id: _Optional[str] = ..., model_size: _Optional[int] = ..., config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., deadline_unix: _Optional[float] = ..., package_sha256: _Optional[str] = ..., package_size: _Optional[int] = ..., stage: _Optional[str] = ..., payload: _Optional[bytes] = ..., client_half: _Optional[str] = ..., codec: _Optional[str] = ..., codec_options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., delta_from: _Optional[str] = ..., delta_size: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "status")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    status: str
    def __init__(self, client_id: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("interval_s", "known")
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    known: bool
    def __init__(self, interval_s: _Optional[float] = ..., known: _Optional[bool] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("client_id", "model_id", "delta_from")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FROM_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model_id: str
    delta_from: str
    def __init__(self, client_id: _Optional[str] = ..., model_id: _Optional[str] = ..., delta_from: _Optional[str] = ...) -> None: ...

class FetchPackageRequest(_message.Message):
    __slots__ = ("client_id", "sha256")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    sha256: str
    def __init__(self, client_id: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "offset", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ...) -> None: ...

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
    def __init__(self, client_id: _Optional[str] = ..., task_id: _Optional[str] = ..., session_id: _Optional[str] = ..., round: _Optional[int] = ..., model_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

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
    def __init__(self, client_id: _Optional[str] = ..., task_id: _Optional[str] = ..., session_id: _Optional[str] = ..., round: _Optional[int] = ..., model_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class StageReply(_message.Message):
    __slots__ = ("client_id", "task_id", "session_id", "round", "stage", "payload")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    task_id: str
    session_id: str
    round: int
    stage: str
    payload: bytes
    def __init__(self, client_id: _Optional[str] = ..., task_id: _Optional[str] = ..., session_id: _Optional[str] = ..., round: _Optional[int] = ..., stage: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class EventReport(_message.Message):
    __slots__ = ("client_id", "level", "message", "task_id", "data", "error_class")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    level: str
    message: str
    task_id: str
    data: _struct_pb2.Struct
    error_class: str
    def __init__(self, client_id: _Optional[str] = ..., level: _Optional[str] = ..., message: _Optional[str] = ..., task_id: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error_class: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
