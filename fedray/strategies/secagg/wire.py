"""The bytes SecAgg+'s stages travel as: task payloads (controller to client) and stage
replies (client to controller), written and read here, nothing else.

Every reader takes bytes from the network and either returns a typed message or raises
``SecAggError("malformed", ...)``: lengths are checked before anything is sliced, counts
are bounded by the bytes present, and nothing is unpickled. A payload starts with the
round's id, so a client's half answers only the round it set up. A reply names no
sender: the controller knows whose reply it is (the client id it came from) and never
takes a client's word for its index.

    advertise payload   RoundSetup and the client's index       reply  Advertise keys
    share payload       the neighbours' keys (a Roster)          reply  the envelopes
    train payload       the envelopes sent to it (an Inbox)     (the update is masked)
    unmask payload      UnmaskRequest                            reply  the shares
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from fedray.errors import FedrayError, SecAggError
from fedray.strategies.secagg import keys
from fedray.strategies.secagg.messages import (
    Envelope,
    Inbox,
    Roster,
    RoundSetup,
    UnmaskRequest,
)
from fedray.strategies.secagg.quantize import ClipMode, Quantizer

VERSION = 1
MODES = tuple(ClipMode)
# graph seed, n, degree, threshold, clip, bits, clip mode, length, max weight, the index
_SETUP = struct.Struct(">32sHHHdBBIIH")


class Reader:
    """Bounded reads over one message: every short or left-over byte is ``malformed``."""

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise SecAggError("malformed", f"the {what} is not bytes")
        self.data, self.at, self.what = bytes(data), 0, what

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise SecAggError("malformed", f"the {self.what} is cut short at byte {self.at}: "
                              "it was truncated in transit or is not a secagg message")
        out = self.data[self.at : self.at + size]
        self.at += size
        return out

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def blob(self) -> bytes:
        return self.take(self.u16())

    def count(self, least_bytes_each: int) -> int:
        n = self.u16()
        if n * least_bytes_each > len(self.data) - self.at:
            raise SecAggError("malformed", f"the {self.what} announces {n} items that its "
                              "bytes cannot hold")
        return n

    def end(self) -> None:
        if self.at != len(self.data):
            raise SecAggError("malformed", f"the {self.what} has {len(self.data) - self.at} "
                              "bytes past its end")


def _u16(value: int) -> bytes:
    return int(value).to_bytes(2, "big")


def _blob(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("a field of a secagg message holds at most 65535 bytes")
    return _u16(len(data)) + data


def _head(round_id: bytes) -> bytes:
    return bytes([VERSION]) + _blob(round_id)


def _read_head(data: bytes, what: str) -> tuple[Reader, bytes]:
    r = Reader(data, what)
    if r.take(1) != bytes([VERSION]):
        raise SecAggError("malformed", f"the {what} is not secagg wire version {VERSION}: "
                          "the client and the controller run different fedray versions")
    return r, r.blob()


def round_of(data: bytes, what: str = "payload") -> bytes:
    """The round id a payload is for (what a client half keys its rounds by)."""
    return _read_head(data, what)[1]


# ----------------------------------------------------------------- controller -> client


def write_setup(setup: RoundSetup, index: int) -> bytes:
    n = len(setup.clients)
    if setup.clients != tuple(range(1, n + 1)):
        raise ValueError("a round's clients are indexed 1..n on the wire")
    q = setup.quantizer
    return _head(setup.round_id) + _SETUP.pack(
        setup.graph_seed, n, setup.degree, setup.threshold, float(q.clip), q.bits,
        MODES.index(q.mode), setup.length, setup.max_weight, index)


def read_setup(data: bytes) -> tuple[RoundSetup, int]:
    r, round_id = _read_head(data, "round setup")
    (seed, n, degree, threshold, clip, bits, mode, length, max_weight,
     index) = _SETUP.unpack(r.take(_SETUP.size))
    r.end()
    try:
        setup = RoundSetup(round_id, seed, tuple(range(1, n + 1)), degree, threshold,
                           Quantizer(clip, bits, MODES[mode] if mode < len(MODES) else "?"),
                           length, max_weight)
    except (ValueError, FedrayError) as exc:  # the quantizer's or the headroom's refusal
        raise SecAggError("malformed", f"the round setup does not hold: {exc}") from None
    if index not in setup.clients:
        raise SecAggError("malformed", f"index {index} is not in the round's 1..{n}")
    return setup, index


def write_roster(round_id: bytes, roster: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    return _head(round_id) + _u16(len(roster)) + b"".join(
        _u16(v) + c + s for v, (c, s) in sorted(roster.items()))


def read_roster(data: bytes) -> tuple[bytes, Roster]:
    r, round_id = _read_head(data, "roster")
    out = {}
    for _ in range(r.count(2 + 2 * keys.KEY_BYTES)):
        v = r.u16()
        out[v] = (r.take(keys.KEY_BYTES), r.take(keys.KEY_BYTES))
    r.end()
    return round_id, Roster(out)


def _write_envelopes(peers: Iterable[tuple[int, bytes]]) -> bytes:
    items = list(peers)
    return _u16(len(items)) + b"".join(_u16(v) + _blob(sealed) for v, sealed in items)


def _read_envelopes(r: Reader) -> list[tuple[int, bytes]]:
    return [(r.u16(), r.blob()) for _ in range(r.count(4))]


def write_inbox(round_id: bytes, inbox: Inbox) -> bytes:
    return _head(round_id) + _u16(inbox.receiver) + _write_envelopes(
        (e.sender, e.sealed) for e in inbox.envelopes)


def read_inbox(data: bytes) -> tuple[bytes, Inbox]:
    r, round_id = _read_head(data, "inbox")
    receiver = r.u16()
    envelopes = tuple(Envelope(v, receiver, sealed) for v, sealed in _read_envelopes(r))
    r.end()
    return round_id, Inbox(receiver, envelopes)


def write_request(round_id: bytes, request: UnmaskRequest) -> bytes:
    def ids(group: frozenset[int]) -> bytes:
        return _u16(len(group)) + b"".join(_u16(v) for v in sorted(group))
    return _head(round_id) + ids(request.survivors) + ids(request.dropped)


def read_request(data: bytes) -> tuple[bytes, UnmaskRequest]:
    r, round_id = _read_head(data, "unmask request")
    survivors = frozenset(r.u16() for _ in range(r.count(2)))
    dropped = frozenset(r.u16() for _ in range(r.count(2)))
    r.end()
    return round_id, UnmaskRequest(survivors, dropped)


# ----------------------------------------------------------------- client -> controller


def write_advertise(c_public: bytes, s_public: bytes) -> bytes:
    return bytes([VERSION]) + c_public + s_public


def read_advertise(data: bytes) -> tuple[bytes, bytes]:
    r = Reader(data, "advertisement")
    if r.take(1) != bytes([VERSION]):
        raise SecAggError("malformed", "the advertisement is not secagg wire version "
                          f"{VERSION}")
    out = r.take(keys.KEY_BYTES), r.take(keys.KEY_BYTES)
    r.end()
    return out


def write_shares(envelopes: Iterable[Envelope]) -> bytes:
    return bytes([VERSION]) + _write_envelopes((e.receiver, e.sealed) for e in envelopes)


def read_shares(data: bytes, sender: int) -> tuple[Envelope, ...]:
    r = Reader(data, "share envelopes")
    if r.take(1) != bytes([VERSION]):
        raise SecAggError("malformed", f"the share envelopes are not wire version {VERSION}")
    out = tuple(Envelope(sender, v, sealed) for v, sealed in _read_envelopes(r))
    r.end()
    return out


def write_unmask(self_shares: Mapping[int, bytes], key_shares: Mapping[int, bytes]) -> bytes:
    def group(shares: Mapping[int, bytes]) -> bytes:
        return _u16(len(shares)) + b"".join(_u16(v) + _blob(s)
                                            for v, s in sorted(shares.items()))
    return bytes([VERSION]) + group(self_shares) + group(key_shares)


def read_unmask(data: bytes) -> tuple[dict[int, bytes], dict[int, bytes]]:
    r = Reader(data, "unmask reply")
    if r.take(1) != bytes([VERSION]):
        raise SecAggError("malformed", f"the unmask reply is not wire version {VERSION}")
    groups = []
    for _ in range(2):
        group: dict[int, bytes] = {}
        for _ in range(r.count(4)):
            v, share = r.u16(), r.blob()
            if v in group:
                raise SecAggError("duplicate_share", f"two shares of client {v} in one reply")
            group[v] = share
        groups.append(group)
    r.end()
    return groups[0], groups[1]
