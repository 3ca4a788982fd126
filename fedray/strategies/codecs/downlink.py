"""The downlink of ``session.codec``: a client that holds the round's parent model fetches
the new one as the codec's delta, and rebuilds it exactly.

A lossy delta cannot rebuild a model the client checks by sha256, unless the model *is*
what the delta rebuilds. So with a codec the controller commits ``parent + decode(Q(new
- parent))`` (``Downlink.step``): the strategy's model moved by the delta the codec can
write, the part it could not write kept in the codec's memory and added to the next
round's delta (topk's error feedback; int8's rounding is unbiased). Combiners keep the
delta beside the model and a client rebuilds it with ``rebuild``, the same arithmetic
on the same bytes, so its sha256 is the committed model's id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedray.serialization import Buffer, decode, encode
from fedray.strategies.codecs.base import Codec
from fedray.strategies.codecs.coded import CodedModel, encode_update


def rebuild(codec: Codec, parent: Buffer, delta: Buffer) -> bytes:
    """The model ``delta`` (the codec's parts, safetensors) makes of ``parent``; the
    parts are checked as an update's are (UpdateRejected when they do not hold)."""
    base = decode(parent)
    view = CodedModel(codec, decode(delta), base)
    return encode({name: view[name] for name in base})


class Downlink:
    """The controller's side: one per session, with the codec's memory across rounds."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.state: dict[str, Any] = {"rng": np.random.default_rng(0)}

    def step(self, parent: Buffer, target: Buffer) -> tuple[bytes, bytes]:
        """(the model to commit, the delta that rebuilds it from ``parent``)."""
        parts = encode_update(self.codec, self.state, decode(target), decode(parent))
        delta = encode(parts)
        return rebuild(self.codec, parent, delta), delta
