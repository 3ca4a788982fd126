"""The one exception hierarchy of fedray, and the registry of its exit codes.

Every error fedray raises on purpose is a class here, and each class has its own
``exit_code``: the `fedray` command exits with it (``fedray.cli.main``), so scripts can
tell one kind of failure from another. A code, once given, keeps its meaning; a new class
takes the next free number (``tests/test_errors.py`` checks that no two classes share one
and that none is defined outside this module).

    code  class                       what happened
       1  FedrayError                 base of them all
       2  ├── ConfigError             a bad config field or CLI argument (names field and file)
      11  │   ├── MissingExtra        a command needs an extra that is not installed
      25  │   └── NotFound            a session, model or file asked for is not there (HTTP 404)
       3  ├── SerializationError      bytes that are not a valid safetensors model
      12  ├── UpdateRejected          an update failed its checks (``reason`` is a short code)
       4  ├── PackageError            a compute package that is unsafe, malformed or failing
      13  │   └── PythonEnvError      its python_env (venv + pip install) could not be built
       5  ├── StorageError            the model store could not read or write
       6  ├── TrackingError           tracking is unreachable or refused a write
      14  │   └── SchemaError         a document that is not what fedray.tracking.schema says
       7  ├── TransportError          a gRPC call to the gateway or a combiner failed
       8  │   ├── AuthError           a credential was missing, wrong, expired or revoked
      15  │   ├── ListenError         a gateway or combiner could not listen on its address
      24  │   ├── UnknownTaskKind     a task of a kind this client does not know (refused)
      26  │   └── ApiError            the federation's HTTP API refused or failed a call
       9  ├── SessionError            a session or round could not complete
      16  │   ├── UnknownSession      a combiner does not know the session (it is sent again)
      17  │   ├── AttemptFailed       one attempt at a round did not commit (it may run again)
      18  │   ├── CombinerError       a combiner did not do its part of a round
      19  │   │   ├── CombinerLost    its actor died or cannot be reached
      20  │   │   ├── CombinerTimeout no answer within the round's deadline and grace
      21  │   │   └── CombinerFailed  the call raised inside the combiner
      27  │   └── SecAggError         secure aggregation could not complete (``reason``: a code)
      10  ├── AlreadyRunning          the federation already runs: another live process owns it
      22  ├── AggregateRefused        the strategy could not aggregate, or its model is refused
      23  ├── NotRunning              `fedray status`: no controller of the federation is alive
      28  └── TierError               the elastic tier could not add or drain a combiner

Lower-layer exceptions (grpc, ray, pymongo, minio) are translated into these once, at the
adapter that calls the library. All of them stay picklable, with their fields, so they can
cross actor boundaries: a class whose ``__init__`` takes other arguments than the message
says how to rebuild it in ``__reduce__``.
"""

from __future__ import annotations


class FedrayError(Exception):
    """Base of every error fedray raises on purpose."""

    exit_code = 1


class ConfigError(FedrayError):
    exit_code = 2


class MissingExtra(ConfigError):
    """A command needs an extra that is not installed; the message is the whole hint
    (``fedray.cli.extras.hint``), printed without the usual ``fedray: error:``."""

    exit_code = 11


class SerializationError(FedrayError):
    exit_code = 3


class UpdateRejected(FedrayError):
    """An update failed a check; ``reason`` is a stable short code for events and metrics."""

    exit_code = 12

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

    exit_code = 13


class StorageError(FedrayError):
    exit_code = 5


class TrackingError(FedrayError):
    exit_code = 6


class SchemaError(TrackingError):
    """A tracking document (or an update's field) that does not match its schema class:
    ``field`` is its dotted path ("" for the document), ``problem`` what is wrong."""

    exit_code = 14

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

    exit_code = 15

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

    exit_code = 16


class AttemptFailed(SessionError):
    """One attempt at a round did not commit; the round may run again."""

    exit_code = 17


class CombinerError(SessionError):
    """A combiner did not do its part of round ``round`` (None: outside a round); ``why``
    says how in a few words, e.g. ``died (ActorDiedError)``. Raised where Ray's errors
    from a combiner call are translated, so the controller decides on fields, not on the
    text of a Ray exception."""

    exit_code = 18

    def __init__(self, combiner: str, round: int | None, why: str) -> None:
        where = f" (round {round})" if round is not None else ""
        super().__init__(f"combiner {combiner}{where}: {why}")
        self.combiner = combiner
        self.round = round
        self.why = why

    def __reduce__(self):
        return (type(self), (self.combiner, self.round, self.why))


class CombinerLost(CombinerError):
    """The combiner's actor died or cannot be reached (Ray may be restarting it)."""

    exit_code = 19


class CombinerTimeout(CombinerError):
    """The combiner gave no answer within the round's deadline plus the grace period."""

    exit_code = 20


class CombinerFailed(CombinerError):
    """The call raised inside the combiner: it is up, but could not do what it was asked."""

    exit_code = 21


class AlreadyRunning(FedrayError):
    """A live process already runs this federation (its data directory, or its actors in
    the Ray cluster); nothing of it was touched."""

    exit_code = 10


class AggregateRefused(FedrayError):
    """The strategy could not aggregate the round, or gave a model that is not committed."""

    exit_code = 22


class NotRunning(FedrayError):
    """No controller of the federation is alive in the cluster (``fedray status``), or no
    Ray cluster answers at the address given."""

    exit_code = 23


class UnknownTaskKind(TransportError):
    """A task of a kind this client does not know (a newer server): it is refused, never
    run as something else."""

    exit_code = 24

    def __init__(self, kind: int, task_id: str) -> None:
        super().__init__(f"task {task_id[:32]} has kind {kind}, which this client does not "
                         "know; upgrade fedray on this client")
        self.kind, self.task_id = kind, task_id

    def __reduce__(self):
        return (type(self), (self.kind, self.task_id))


class NotFound(ConfigError):
    """What was asked for (a session, a model) is not there; the API answers 404."""

    exit_code = 25


class ApiError(TransportError):
    """The federation's HTTP API refused or failed a call (``fedray.api``); the message is
    the API's own."""

    exit_code = 26

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        return (type(self), (str(self), self.status))


class SecAggError(SessionError):
    """Secure aggregation could not go on, and revealed nothing it should not have:
    ``reason`` is a stable short code (``too_few_shares``, ``duplicate_share``,
    ``malformed_share``, ``tampered``, ``too_few_survivors``, ``refused``...), ``detail``
    says what to do about it."""

    exit_code = 27

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"secure aggregation: {reason}: {detail}" if detail
                         else f"secure aggregation: {reason}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return (type(self), (self.reason, self.detail))


class TierError(FedrayError):
    """The elastic tier could not add or drain a combiner (the message says which, and
    why); the tier is left as it was before the change."""

    exit_code = 28
