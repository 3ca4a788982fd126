"""The client side of ``session.codec``: a train task's update written as its delta.

The task names the codec and its options; the client encodes what its train returned
(after the strategy's client half: clipping and noise come first) against the task's
model. What a codec remembers between rounds (topk's error feedback, int8's random
generator) is kept per session, for the session running and the one before it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from fedray.errors import ConfigError, FedrayError
from fedray.messages import Task
from fedray.serialization import Buffer, decode, encode
from fedray.strategies.codecs import Codec, make_codec
from fedray.strategies.codecs.coded import encode_update
from fedray.strategies.codecs.downlink import rebuild

KEPT = 2  # sessions whose codec memory is kept


class UpdateCoding:
    def __init__(self) -> None:
        self._states: OrderedDict[tuple[str, str], tuple[Codec, dict[str, Any]]] = OrderedDict()

    def _codec(self, task: Task) -> tuple[Codec, dict[str, Any]]:
        key = (task.session_id, task.codec + json.dumps(task.codec_options, sort_keys=True,
                                                         default=str))
        found = self._states.get(key)
        if found is None:
            try:
                codec = make_codec(task.codec, dict(task.codec_options))
            except ConfigError as exc:
                raise FedrayError(f"the task's update codec cannot be used here: {exc}; "
                                  "is this client's fedray older than the federation's?") from None
            if codec is None:
                raise FedrayError("the task names update codec 'none' as a codec")
            found = (codec, {})
            self._states[key] = found
            while len(self._states) > KEPT:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return found

    def rebuild(self, task: Task, parent: Buffer, delta: Buffer) -> bytes:
        """The task's model from ``parent`` and the codec ``delta`` the combiner sent."""
        codec, _ = self._codec(task)
        return rebuild(codec, parent, delta)

    def encode(self, task: Task, update: Buffer, base: Buffer) -> bytes:
        """``update`` (safetensors) as the task's codec writes it against ``base``."""
        codec, state = self._codec(task)
        try:
            parts = encode_update(codec, state, decode(update), decode(base))
        except ValueError as exc:
            raise FedrayError(f"the update cannot be encoded with codec {codec.name}: "
                              f"{exc}") from None
        return encode(parts)
