"""Bounded downloads from a combiner: a model into one buffer, a package to a file.

A combiner, or whoever sits between it and the client, decides how many bytes a stream
carries; the client does not have to take them all. Each download stops as soon as it
runs past the size the task announced (0: unknown) or past this client's own cap, and a
model is assembled in one preallocated buffer, so its peak is the model's size, not twice
that. A model is checked against its sha256 as it arrives (``checked``), a package by the
caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import grpc

from fedray.bridge.proto import fedray_v1_pb2 as pb
from fedray.bridge.proto import fedray_v1_pb2_grpc as pb_grpc
from fedray.bridge.streamhash import StreamHash
from fedray.errors import FedrayError, PackageError, TransportError

MiB = 1024 * 1024
DEFAULT_MAX_MODEL_MB = 4096  # a model larger than this needs --max-model-mb
DEFAULT_MAX_PACKAGE_MB = 512  # a compute package larger than this needs --max-package-mb


def _limit(announced: int, cap: int, what: str, option: str, error: type[FedrayError]) -> int:
    """How many bytes a download may bring: the announced size, or the cap when unknown."""
    if announced > cap:
        raise error(f"{what} is {announced} bytes, more than this client accepts "
                    f"({cap // MiB} MiB; raise it with {option})")
    return announced or cap


def _overrun(announced: int, limit: int, what: str, option: str) -> str:
    if announced:
        return f"{what}: the combiner sent more than the {limit} bytes the task announced"
    return f"{what}: the combiner sent more than the {limit} bytes this client accepts ({option})"


async def fetch_model(stub: pb_grpc.CombinerStub, metadata, client_id: str, model_id: str,
                      size: int, cap: int, delta_from: str = "", checked: bool = False,
                      ) -> memoryview:
    """The model's bytes, read-only (the cache keeps them); ``size`` 0 means unknown. With
    ``delta_from``, the codec delta that rebuilds it from that model (the caller does).
    ``checked``: the bytes are the model ``model_id`` names (its sha256), hashed while they
    arrive; TransportError when they are not."""
    what = f"model {model_id[:12]}" + (f" (delta from {delta_from[:12]})" if delta_from else "")
    limit = _limit(size, cap, what, "--max-model-mb", TransportError)
    buffer = bytearray(size)  # grows chunk by chunk only when the size is unknown
    view = memoryview(buffer) if size else None
    hasher = StreamHash(buffer) if checked and size else None
    received = 0
    call = stub.FetchModel(pb.FetchModelRequest(client_id=client_id, model_id=model_id,
                                                delta_from=delta_from), metadata=metadata)
    with _not_found_is(TransportError), _cancelled_on_error(call):
        async for chunk in call:
            end = received + len(chunk.data)
            if end > limit:
                raise TransportError(_overrun(size, limit, what, "--max-model-mb"))
            if view is not None:
                view[received:end] = chunk.data
            else:
                buffer += chunk.data
            received = end
            if hasher is not None:
                await hasher.advance(received)
    if size and received != size:
        raise TransportError(f"{what} arrived truncated ({received} of {size} bytes)")
    if checked:
        digest = await hasher.hexdigest(received) if hasher is not None \
            else await asyncio.to_thread(lambda: hashlib.sha256(buffer).hexdigest())
        if digest != model_id:
            raise TransportError(f"model {model_id[:12]} arrived corrupted (checksum mismatch)")
    return memoryview(buffer).toreadonly()


async def fetch_package(stub: pb_grpc.CombinerStub, metadata, client_id: str, sha256: str,
                        size: int, cap: int, dest: Path) -> None:
    """Write the package to ``dest`` (atomically: a partial download leaves nothing)."""
    what = f"package {sha256[:12]}"
    limit = _limit(size, cap, what, "--max-package-mb", PackageError)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    received = 0
    try:
        with open(fd, "wb") as out:  # owns fd before anything else can fail
            call = stub.FetchPackage(pb.FetchPackageRequest(client_id=client_id,
                                                            sha256=sha256), metadata=metadata)
            with _not_found_is(PackageError), _cancelled_on_error(call):
                async for chunk in call:
                    received += len(chunk.data)
                    if received > limit:
                        raise PackageError(_overrun(size, limit, what, "--max-package-mb"))
                    out.write(chunk.data)
        if size and received != size:
            raise PackageError(f"{what} arrived truncated ({received} of {size} bytes)")
        os.replace(partial, dest)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _cancelled_on_error(call):
    """Hang up a stream we stop reading, so the combiner stops sending at once."""
    try:
        yield
    except BaseException:
        call.cancel()
        raise


@contextlib.contextmanager
def _not_found_is(error: type[Exception]):
    """NOT_FOUND fails the task (as ``error``); other RPC errors mean a broken connection."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            raise error(exc.details()) from None
        raise
