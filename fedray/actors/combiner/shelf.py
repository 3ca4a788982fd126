"""The models a combiner serves: each serialized once, streamed to every client in chunks.

A model arrives as the controller's object-store bytes (zero-copy inside the actor); its
id is the sha256 the controller computed once. The shelf keeps the last few (the round's
model and the one before, for clients a little late; asynchronously, every version an
update may still start from) and counts the bytes it streams out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from fedray.actors.combiner.share import ModelVersion
from fedray.serialization import decode, model_id, read_layout

KEPT_MODELS = 2  # the round's model and the one before, for clients that are a bit late


class ModelShelf:
    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.models: OrderedDict[str, np.ndarray] = OrderedDict()
        self.deltas: dict[str, tuple[str, np.ndarray]] = {}  # model id -> (from, codec delta)
        self.bytes_out = 0

    def get(self, wanted: str) -> np.ndarray | None:
        return self.models.get(wanted)

    def keep(self, data: np.ndarray, version: int, known_id: str = "",
             keep: int = KEPT_MODELS) -> ModelVersion:
        """Serve ``data`` from now on (the oldest beyond ``keep`` go)."""
        mid = known_id or model_id(data)  # the controller hashed it once already
        self.models[mid] = data
        self.models.move_to_end(mid)
        while len(self.models) > keep:
            gone, _ = self.models.popitem(last=False)
            self.deltas.pop(gone, None)
        layout = read_layout(data)
        return ModelVersion(version, mid, layout, decode(data, layout), int(data.nbytes))

    def keep_delta(self, model: str, parent: str, delta: bytes) -> None:
        """Serve ``model`` also as the codec delta from ``parent`` (session.codec's downlink)."""
        if model in self.models and delta:
            self.deltas[model] = (parent, np.frombuffer(delta, np.uint8))

    def delta_of(self, model: str) -> tuple[str, int]:
        """(parent, size) of the delta ``model`` is served as, or ("", 0)."""
        found = self.deltas.get(model)
        return (found[0], int(found[1].nbytes)) if found else ("", 0)

    def chunks(self, wanted: str, delta_from: str = "") -> Iterator[tuple[memoryview, int, int]]:
        """The model ``wanted`` as (chunk, offset, total) slices of the one serialized copy;
        with ``delta_from``, its codec delta from that model (KeyError: none kept)."""
        if delta_from:
            found = self.deltas.get(wanted)
            if found is None or found[0] != delta_from:
                raise KeyError(wanted)
            data = found[1]
        else:
            data = self.models.get(wanted)
        if data is None:
            raise KeyError(wanted)
        view = memoryview(data).cast("B")
        total = len(view)
        for offset in range(0, max(total, 1), self.chunk_bytes):
            chunk = view[offset : offset + self.chunk_bytes]
            self.bytes_out += len(chunk)
            yield chunk, offset, total
