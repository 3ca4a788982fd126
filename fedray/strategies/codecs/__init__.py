"""Update codecs: fewer bytes on the wire (``session.codec``, ``session.codec_kwargs``).

A codec rewrites each floating tensor's *delta* from the round's model on the client and
the combiner folds it back block by block (``coded.CodedModel``), without a float32 copy
of the update. It applies under any strategy whose update layout is the default one,
after the strategy's client half (clipping and noise come before encoding) and before
its rule (robust strategies see decoded updates).

    none    the update as trained (the default)
    fp16    the delta in half precision: 2x fewer bytes
    int8    8-bit values, a scale per block, stochastic rounding: 3.9x fewer
    topk    the largest fraction of values, error feedback on the client: 1/(2 fraction)
"""

from __future__ import annotations

from typing import Any

from fedray.errors import ConfigError
from fedray.strategies.codecs.base import Codec
from fedray.strategies.codecs.fp16 import Fp16
from fedray.strategies.codecs.int8 import Int8
from fedray.strategies.codecs.topk import TopK

NONE = "none"
CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp16, Int8, TopK)}

__all__ = ["CODECS", "NONE", "Codec", "make_codec"]


def make_codec(name: str, options: dict[str, Any] | None = None) -> Codec | None:
    """The codec ``session.codec`` names (None for ``none``); a ConfigError that lists the
    codecs, or names the option that does not fit, otherwise."""
    name = (name or NONE).strip().lower()
    if name == NONE:
        if options:
            raise ConfigError(f"session.codec_kwargs {sorted(options)} are set but "
                              "session.codec is none; set session.codec or drop them")
        return None
    cls = CODECS.get(name)
    if cls is None:
        raise ConfigError(f"session.codec {name!r} is not a codec; use one of: "
                          f"{', '.join([NONE, *CODECS])}")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"session.codec_kwargs must be a mapping, got "
                          f"{type(options).__name__}")
    try:
        return cls(**(options or {}))
    except TypeError as exc:
        raise ConfigError(f"session.codec_kwargs do not fit codec {name!r}: {exc}; e.g. "
                          f"{cls.option_examples or '{}'}") from None
    except ValueError as exc:
        raise ConfigError(f"session.codec_kwargs: {exc}") from None
