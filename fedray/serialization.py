"""Models as safetensors bytes: encode, decode (zero-copy, validated), and model ids.

A model is an ordered mapping of names to numpy arrays. On the wire and on disk it is the
safetensors format (never pickle); its id is the sha256 of those bytes, so stores and
caches are content-addressed. ``decode`` parses the header itself and checks every offset
before building read-only views into the buffer, so untrusted bytes cannot make it read
out of bounds or allocate a copy of the model.

At the edges a model may also be an ``.npz`` (``decode_npz``: any arrays, no pickle), and
in particular FEDn's numpy-helper file (``encode_fedn_npz``): a list of arrays saved with
``np.savez_compressed`` under the keys ``"0"``, ``"1"``, ... A FEDn model keeps those
keys as its tensor names, so the mapping is the same in both directions and bit-exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save as _st_save

from fedray.errors import SerializationError

Model = dict[str, np.ndarray]
Buffer = bytes | bytearray | memoryview | np.ndarray

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_DIMS = 32  # dimensions of one tensor
MAX_INT_DIGITS = 20  # any integer in a header: 2**64 has 20 digits
MAX_DIM = 1 << 48  # one dimension; bigger is no tensor anyone can hold

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


_SUPPORTED = {d.str.lstrip("<>|=") for d in _DTYPES.values()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Layout:
    """What a safetensors header says: tensors in file order and where data begins."""

    tensors: dict[str, TensorInfo]
    data_offset: int
    total_size: int

    def spec(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (t.dtype, t.shape) for name, t in self.tensors.items()}


def spec_nbytes(spec: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """The bytes of tensor data a model of ``spec`` holds (its header aside)."""
    total = 0
    for dtype, shape in spec.values():
        count = 1
        for dim in shape:
            count *= int(dim)
        total += count * _DTYPES[dtype].itemsize
    return total


def model_id(data: Buffer) -> str:
    return hashlib.sha256(memoryview(data).cast("B") if not isinstance(data, bytes) else data).hexdigest()


def encode(model: Mapping[str, np.ndarray]) -> bytes:
    """Serialize a model; names keep their order in the mapping for readability only.

    The bytes are exactly what ``safetensors.numpy.save`` writes (its tensor order, its
    header), but built with one copy of the tensors: safetensors assembles the file in a
    buffer of its own first and then copies that into the result, two model-sized
    allocations at once.
    """
    if not model:
        raise SerializationError("a model needs at least one tensor")
    arrays = {}
    for name, value in model.items():
        if not isinstance(name, str):
            raise SerializationError(f"tensor names must be strings, got {name!r}")
        arr = np.asarray(value)  # not ascontiguousarray: it turns a 0-d scalar into shape (1,)
        if arr.dtype.str.lstrip("<>|=") not in _SUPPORTED:
            raise SerializationError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))  # safetensors is little-endian
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        arrays[name] = arr
    if not all(name.isprintable() for name in arrays):
        return _st_save(arrays)  # names JSON escapes: let safetensors write its own header
    # safetensors' order (by dtype, then name) and dtype names, from empty stand-ins.
    skeleton = read_layout(_st_save({name: np.empty(0, a.dtype) for name, a in arrays.items()}))
    header: dict[str, dict[str, object]] = {}
    parts: list[np.ndarray] = []
    offset = 0
    for name, info in skeleton.tensors.items():
        arr = arrays[name]
        header[name] = {"dtype": info.dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        parts.append(arr.reshape(-1).view(np.uint8))
        offset += arr.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return b"".join([struct.pack("<Q", len(text)), text, *parts])


def _bounded_int(text: str) -> int:
    # json.loads calls this for every integer literal: a number thousands of digits long
    # is refused before Python turns it into an int (and before any arithmetic on it).
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(text)} digits")
    return int(text)


def read_layout(data: Buffer, max_header: int = MAX_HEADER_BYTES) -> Layout:
    """Parse and bound-check a safetensors header without touching the tensor data."""
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise SerializationError("model bytes are shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > min(max_header, MAX_HEADER_BYTES) or 8 + header_len > len(view):
        raise SerializationError(f"safetensors header length {header_len} is out of bounds")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]), parse_int=_bounded_int)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise SerializationError(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SerializationError("safetensors header is not a JSON object")
    data_offset = 8 + header_len
    data_len = len(view) - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(name, entry, data_len)
    if not tensors:
        raise SerializationError("model has no tensors")
    return Layout(tensors=tensors, data_offset=data_offset, total_size=len(view))


def _tensor_info(name: str, entry: object, data_len: int) -> TensorInfo:
    # Strict: JSON integers only (no floats, strings, booleans or Infinity to coerce), and
    # sizes in Python ints, so no dimension can overflow into a small byte count.
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise SerializationError(f"tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise SerializationError(f"tensor {name!r} has unsupported dtype {str(dtype)[:20]!r}")
    if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
        raise SerializationError(f"tensor {name!r} needs integer shape and data_offsets")
    if len(shape) > MAX_DIMS or any(not 0 <= d <= MAX_DIM for d in shape):
        raise SerializationError(f"tensor {name!r} has a dimension out of bounds")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise SerializationError(f"tensor {name!r} claims bytes {start}:{end} of {data_len}")
    nbytes = _nbytes(shape, _DTYPES[dtype].itemsize, data_len)
    if not 0 <= start <= end <= data_len or end - start != nbytes:
        raise SerializationError(
            f"tensor {name!r} claims bytes {start}:{end} but needs {nbytes} of {data_len}"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """``prod(shape) * itemsize``, stopping as soon as it passes ``limit`` (no huge ints)."""
    if 0 in shape:
        return 0
    total = itemsize
    for d in shape:
        total *= d
        if total > limit:
            return limit + 1  # more than there is: refused by the caller
    return total


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def decode(data: Buffer, layout: Layout | None = None) -> Model:
    """Read-only numpy views into ``data``, in file order; copy them if you must write."""
    layout = layout or read_layout(data)
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    model: Model = {}
    for name, info in layout.tensors.items():
        dtype = _DTYPES[info.dtype]
        begin = layout.data_offset + info.start
        flat = buf[begin : layout.data_offset + info.end].view(dtype) if info.end > info.start \
            else np.empty(0, dtype=dtype)
        arr = flat.reshape(info.shape)
        arr.flags.writeable = False
        model[name] = arr
    return model


def copy_model(model: Mapping[str, np.ndarray]) -> Model:
    return {name: np.array(arr, copy=True) for name, arr in model.items()}


def writable_copy(data: Buffer) -> tuple[bytearray, Model]:
    """A private copy of ``data`` and writable views into it. A train callback that updates
    these arrays in place hands back a model that is already serialized
    (``serialized_in_place``): no second copy of the model to encode it."""
    buf = bytearray(data)
    model = decode(buf)
    for arr in model.values():
        if arr.size:  # an empty tensor is not a view (nothing to write)
            arr.flags.writeable = True
    return buf, model


def serialized_in_place(buf: bytearray, views: Mapping[str, np.ndarray],
                        new: Mapping[str, object]) -> bytearray | None:
    """``buf`` when ``new`` holds exactly the arrays ``writable_copy`` gave out (updated in
    place, or not at all), else None (encode ``new``)."""
    if set(new) != set(views) or any(new[name] is not view for name, view in views.items()):
        return None
    return buf


MAX_NPZ_BYTES = 64 * 1024**3  # what an .npz may unpack to (its arrays, uncompressed)
_POSITION_RE = re.compile(r"0|[1-9][0-9]{0,8}")


def positions(names) -> list[str] | None:
    """``names`` in FEDn's order (``"0"``, ``"1"``, ...) when they are exactly the positions
    0..n-1 of a numpy-helper list, else None."""
    names = list(names)
    if not names or not all(_POSITION_RE.fullmatch(n) for n in names):
        return None
    ordered = sorted(names, key=int)
    return ordered if ordered == [str(i) for i in range(len(names))] else None


def describe_names(names, limit: int = 4) -> str:
    """A few of ``names`` for an error message: ``'a', 'b', ... (7 in all)``."""
    names = sorted(names, key=lambda n: (len(n), n))
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def decode_npz(source: Buffer | str, max_bytes: int = MAX_NPZ_BYTES) -> Model:
    """The arrays of an ``.npz`` (bytes or a path), by key; pickled objects are refused,
    and so is an archive that would unpack to more than ``max_bytes``."""
    if not isinstance(source, str):
        return _read_npz(io.BytesIO(bytes(source)), max_bytes)
    try:
        with open(source, "rb") as fh:
            return _read_npz(fh, max_bytes)
    except OSError as exc:
        raise SerializationError(f"cannot read {source} ({exc.strerror})") from None


def _read_npz(fh, max_bytes: int) -> Model:
    model: Model = {}
    try:
        with zipfile.ZipFile(fh) as archive:
            infos = archive.infolist()
            if sum(info.file_size for info in infos) > max_bytes:
                raise SerializationError(f"npz unpacks to more than {max_bytes} bytes")
            for info in infos:
                name = info.filename.removesuffix(".npy")
                if name in model:
                    raise SerializationError(f"npz holds array {name!r} twice")
                with archive.open(info) as member:
                    model[name] = np.lib.format.read_array(member, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise SerializationError(f"not an npz file ({exc})") from None
    except ValueError as exc:  # a pickled object array, or a malformed .npy header
        raise SerializationError(f"npz holds an array numpy cannot read without pickle "
                                 f"({str(exc)[:120]})") from None
    if not model:
        raise SerializationError("npz holds no arrays")
    return model


def encode_fedn_npz(model: Mapping[str, np.ndarray]) -> bytes:
    """FEDn's numpy-helper file of ``model``, whose tensors must be named ``"0"``..``"n-1"``
    (``helper.load(path)`` returns them as a list in that order)."""
    order = positions(model)
    if order is None:
        raise SerializationError(
            f"tensors named {describe_names(model)} are not the positions '0', '1', ... "
            "of FEDn's numpy helper (only a model that started from a numpy-helper seed.npz "
            "has them)")
    out = io.BytesIO()
    np.savez_compressed(out, **{name: np.asarray(model[name]) for name in order})
    return out.getvalue()
