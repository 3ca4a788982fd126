"""The one exception hierarchy of fedray.

    FedrayError                 base; ``exit_code`` is what the CLI exits with
    ├── ConfigError             a bad config field or CLI argument (names the field and file)
    ├── SerializationError      bytes that are not a valid safetensors model
    ├── UpdateRejected          an update failed its checks (``reason`` is a short code)
    ├── PackageError            a compute package that is unsafe, malformed or failing
    │   └── PythonEnvError      its python_env (venv + pip install) could not be built
    ├── StorageError            the model store could not read or write
    ├── TrackingError           the tracking database is unreachable or refused a write
    │   └── SchemaError         a document that is not what fedray.tracking.schema says
    ├── TransportError          a gRPC call to the gateway or a combiner failed
    │   ├── AuthError           the token was missing, wrong or revoked
    │   └── ListenError         a gateway or combiner could not listen on its address
    ├── SessionError            a session or round could not complete
    └── AlreadyRunning          the federation already runs: another live process owns it

Lower-layer exceptions (grpc, ray, pymongo, minio) are translated into these once, at the
adapter that calls the library. All of them stay picklable so they can cross actor
boundaries.
"""

from __future__ import annotations


class FedrayError(Exception):
    """Base of every error fedray raises on purpose."""

    exit_code = 1


class ConfigError(FedrayError):
    exit_code = 2


class SerializationError(FedrayError):
    exit_code = 3


class UpdateRejected(FedrayError):
    """An update failed a check; ``reason`` is a stable short code for events and metrics."""

    exit_code = 3

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return (type(self), (self.reason, self.detail))


class PackageError(FedrayError):
    exit_code = 4


class PythonEnvError(PackageError):
    """A compute package's ``python_env`` could not be built (pip's error, in one line)."""


class StorageError(FedrayError):
    exit_code = 5


class TrackingError(FedrayError):
    exit_code = 6


class SchemaError(TrackingError):
    """A tracking document (or an update's field) that does not match its schema class:
    ``field`` is its dotted path ("" for the document), ``problem`` what is wrong."""

    def __init__(self, collection: str, field: str, problem: str) -> None:
        where = f"field {field!r} " if field else ""
        super().__init__(f"tracking {collection}: {where}{problem}")
        self.collection = collection
        self.field = field
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.collection, self.field, self.problem))


class TransportError(FedrayError):
    exit_code = 7


class AuthError(TransportError):
    exit_code = 8


class ListenError(TransportError):
    """A server could not bind ``address``; ``in_use`` when the port was the reason."""

    def __init__(self, address: str, reason: str, in_use: bool = False) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason
        self.in_use = in_use

    def __reduce__(self):
        return (type(self), (self.address, self.reason, self.in_use))


class SessionError(FedrayError):
    exit_code = 9


class UnknownSession(SessionError):
    """A combiner was asked about a session whose strategy it was never given (or forgot,
    after Ray restarted it): the controller sends the strategy again and retries."""


class AlreadyRunning(FedrayError):
    """A live process already runs this federation (its data directory, or its actors in
    the Ray cluster); nothing of it was touched."""

    exit_code = 10


class AttemptFailed(SessionError):
    """One attempt at a round did not commit; the round may run again."""


class AggregateRefused(FedrayError):
    """The strategy could not aggregate the round, or gave a model that is not committed."""


class CombinerError(SessionError):
    """A call from the controller to one combiner did not give an answer: ``combiner``
    names it, ``round`` the round it was for (None outside a round), ``why`` says what
    happened in one line."""

    def __init__(self, combiner: str, round: int | None, why: str) -> None:
        where = f"combiner {combiner}" + (f" (round {round})" if round is not None else "")
        super().__init__(f"{where}: {why}")
        self.combiner, self.round, self.why = combiner, round, why

    def __reduce__(self):
        return (type(self), (self.combiner, self.round, self.why))


class CombinerLost(CombinerError):
    """The combiner actor died, or cannot be reached (Ray restarts it)."""


class CombinerTimeout(CombinerError):
    """The combiner gave no answer within the round's deadline and its grace."""


class CombinerFailed(CombinerError):
    """The call raised inside the combiner."""


class UnknownTaskKind(TransportError):
    """A task of a kind this client does not know (a newer server): it is refused, never
    run as something else."""

    def __init__(self, kind: int, task_id: str) -> None:
        super().__init__(f"task {task_id[:32]} has kind {kind}, which this client does not "
                         "know; upgrade fedray on this client")
        self.kind, self.task_id = kind, task_id

    def __reduce__(self):
        return (type(self), (self.kind, self.task_id))
