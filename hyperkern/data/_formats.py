"""Readers for the on-disk formats of the datasets, each strict about what it accepts.

- IDX (MNIST, Fashion-MNIST): big-endian header, raw or gzip-compressed.
- CIFAR-10/100 python batches: pickled dicts, read through a restricted unpickler that can build
  only the containers, bytes and numpy arrays those files hold. Nothing else is importable while
  unpickling, so a hostile file cannot run code; it is refused with an error naming the path.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib

import numpy as np

__all__ = ["read_idx", "read_cifar_batch", "restricted_unpickle", "DataFileError"]


class DataFileError(ValueError):
    """A data file is missing, truncated, corrupt or not in the expected format."""


# The largest IDX body accepted (16 GiB; MNIST's training images are 47 MB): a header announcing more
# is refused before anything is read.
_MAX_IDX_BYTES = 16 << 30

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class _Inflater:
    """Streaming reader of a file's bytes, inflating gzip (every member of a multi-member file) as it
    reads: read(n) returns at most n bytes, so a caller that knows how much it needs never holds more
    than that (plus one compressed chunk), however far the stream would inflate."""

    def __init__(self, f, path: str, what: str):
        self.f, self.path, self.what = f, path, what
        self.gzip = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if self.gzip else None
        self.pending = b""  # compressed bytes read from the file, not yet given to the inflater

    def read(self, n: int) -> bytes:
        if not self.gzip:
            return self.f.read(n)
        out = []
        want = n
        try:
            while want > 0:
                if self.inflate.eof:  # the member ended: another may follow (gzip allows several)
                    # what follows the member is in unused_data (unconsumed_tail may still repeat it)
                    rest = self.inflate.unused_data
                    self.pending = b""
                    if not rest:
                        rest = self.f.read(_CHUNK)
                    if not rest:
                        break
                    self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self.pending = rest
                if not self.pending:
                    self.pending = self.f.read(_CHUNK)
                    if not self.pending:
                        tail = self.inflate.flush(want)
                        out.append(tail)
                        want -= len(tail)
                        if not self.inflate.eof:
                            raise DataFileError(f"{self.path}: truncated gzip stream (it ends before its "
                                                f"end-of-stream marker); expected {self.what}")
                        continue
                chunk = self.inflate.decompress(self.pending, want)
                self.pending = self.inflate.unconsumed_tail
                out.append(chunk)
                want -= len(chunk)
        except zlib.error as exc:
            raise DataFileError(f"{self.path}: corrupt gzip stream ({exc}); expected {self.what}") from exc
        return b"".join(out)


def _read_bytes(path: str, what: str) -> bytes:
    """The whole file, inflated when it is gzip; errors name the path."""
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: file not found (expected {what})")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise DataFileError(f"{path}: corrupt gzip stream ({type(exc).__name__}: {exc}); expected "
                                f"{what}") from exc
    return raw


def read_idx(path: str, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed or not) into a numpy array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; then the data, big-endian, C order. The file must hold exactly that many bytes.

    The header is read first and the rest only up to the size it announces (plus one byte, to tell a
    longer file): a gzip stream that inflates beyond it is refused without being inflated, so memory
    stays bounded by the announced size. Every error is a DataFileError naming the path.
    """
    what = f"an IDX file{'' if expected_ndim is None else f' with {expected_ndim} dimensions'} (MNIST format)"
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: file not found (expected {what})")
    with open(path, "rb") as f:
        stream = _Inflater(f, path, what)
        magic = stream.read(4)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
            raise DataFileError(f"{path}: bad IDX magic number {magic.hex() or '(empty file)'}; expected {what} "
                                "starting with 00 00 <type code 08/09/0b/0c/0d/0e> <ndim>")
        dtype, ndim = _IDX_DTYPES[magic[2]], magic[3]
        if expected_ndim is not None and ndim != expected_ndim:
            raise DataFileError(f"{path}: IDX file has {ndim} dimensions; expected {what}")
        dims = stream.read(4 * ndim)
        header = 4 + 4 * ndim
        if len(dims) < 4 * ndim:
            raise DataFileError(f"{path}: truncated IDX header ({4 + len(dims)} bytes); expected {what}")
        shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
        count = math.prod(shape)  # a Python int: no int64 overflow (dims are up to 2^32 - 1 each)
        expected_bytes = header + count * dtype.itemsize
        if not stream.gzip:
            size = os.fstat(f.fileno()).st_size
            if size != expected_bytes:  # decided before reading the data
                raise DataFileError(f"{path}: IDX header announces shape {shape} of {dtype.name} "
                                    f"({expected_bytes} bytes in all) but the file holds {size} bytes; the file is "
                                    "truncated or corrupt")
        if expected_bytes - header > _MAX_IDX_BYTES:
            raise DataFileError(f"{path}: IDX header announces shape {shape} of {dtype.name} ({expected_bytes} "
                                f"bytes), more than the {_MAX_IDX_BYTES} bytes this reader accepts; the file is "
                                "corrupt")
        body = stream.read(expected_bytes - header + 1)
    if header + len(body) != expected_bytes:
        held = f"{header + len(body)} bytes" if header + len(body) < expected_bytes else "more bytes"
        raise DataFileError(f"{path}: IDX header announces shape {shape} of {dtype.name} ({expected_bytes} bytes "
                            f"in all) but the {'inflated ' if stream.gzip else ''}file holds {held}; the file is "
                            "truncated or corrupt")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------
# CIFAR python batches

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


def _safe_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct an array of type {subtype!r}; only numpy.ndarray")
    return _numpy_reconstruct(np.ndarray, shape, dtype)


def _safe_dtype(obj, align=False, copy=False):
    dtype = np.dtype(obj, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing a numpy object dtype in a data file")
    return dtype


def _safe_encode(obj, encoding="utf-8", errors="strict"):
    # protocol-2 pickles written by Python 3 spell bytes objects as _codecs.encode(str, "latin1")
    if not isinstance(obj, str) or not isinstance(encoding, str) or not isinstance(errors, str):
        raise pickle.UnpicklingError("refusing _codecs.encode on anything but text")
    return obj.encode(encoding, errors)


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed; a CIFAR batch holds only dicts, lists, bytes, "
                "ints and numpy arrays") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a data file")


# Bounds on what a data file may unpickle to, as a tree: nesting depth, and its expanded size in
# bytes (8 per container slot, the length of each bytes / str, the bytes of each array), at most
# _EXPANSION times the pickle's own size plus 1 MiB. Memo references let a few hundred bytes of pickle
# describe a tree of 40^7 leaves; a real CIFAR batch expands to about its file size.
_MAX_DEPTH = 8
_EXPANSION = 16
_SLOT = 8


def _check_plain(root, size_limit: int):
    """Only containers, scalars, bytes/str and numeric numpy arrays may come out of a data file, nested
    at most _MAX_DEPTH deep and expanding to at most size_limit bytes as a tree. Linear time: each
    object is visited once (memo references share objects; their expanded sizes are remembered)."""
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded size, height) of a checked container
    open_ids: set[int] = set()  # containers being checked: meeting one again is a cycle

    def visit(obj, depth: int) -> tuple[int, int]:
        if isinstance(obj, (dict, list, tuple)):
            key = id(obj)
            if key in done:
                size, height = done[key]
            else:
                if key in open_ids:
                    raise pickle.UnpicklingError("data file holds a container that contains itself")
                if depth > _MAX_DEPTH:
                    raise pickle.UnpicklingError(f"data file nests containers more than {_MAX_DEPTH} deep")
                open_ids.add(key)
                size, height = _SLOT, 0
                children = (c for kv in obj.items() for c in kv) if isinstance(obj, dict) else obj
                for child in children:
                    child_size, child_height = visit(child, depth + 1)
                    size += _SLOT + child_size
                    height = max(height, child_height + 1)
                    if size > size_limit:
                        break
                open_ids.discard(key)
                done[key] = (size, height)
            if depth + height > _MAX_DEPTH:
                raise pickle.UnpicklingError(f"data file nests containers more than {_MAX_DEPTH} deep")
            if size > size_limit:
                raise pickle.UnpicklingError(f"data file expands to more than {size_limit} bytes (shared "
                                             "references repeat its objects); refusing it")
            return size, height
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biuf":
                raise pickle.UnpicklingError(f"numpy array of dtype {obj.dtype} is not allowed in a data file")
            return int(obj.nbytes), 0
        if isinstance(obj, (bytes, str)):
            return len(obj), 0
        if isinstance(obj, (int, float, bool, type(None))):
            return _SLOT, 0
        raise pickle.UnpicklingError(f"object of type {type(obj).__name__} is not allowed in a data file")

    size, _ = visit(root, 0)
    if size > size_limit:
        raise pickle.UnpicklingError(f"data file expands to more than {size_limit} bytes; refusing it")


def restricted_unpickle(data: bytes, path: str = "<bytes>"):
    """Unpickle data admitting only dict/list/tuple, bytes/str, numbers and numpy arrays (numeric
    dtypes). Python-2 strings load as bytes (encoding="bytes"), as in the CIFAR python batches.
    Anything else, e.g. a global that would run code, raises DataFileError naming path; so does a
    structure nested more than 8 deep or expanding (through shared memo references) to more than 16
    times the pickle's size plus 1 MiB, refused in time linear in the number of distinct objects."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        _check_plain(obj, _EXPANSION * len(data) + (1 << 20))
    except DataFileError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError from numpy on corrupt data, ...
        raise DataFileError(f"{path}: refused or unreadable pickle ({type(exc).__name__}: {exc}); expected a "
                            "CIFAR python batch (a dict of bytes, lists and numpy arrays)") from exc
    return obj


def read_cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: returns images (N, 3, 32, 32) uint8 and labels (N,) int64.

    label_key is "labels" (CIFAR-10) or "fine_labels" (CIFAR-100). The file must be a pickled dict
    with b"data" a (N, 3072) uint8 array and b"<label_key>" a list of N ints.
    """
    what = f"a CIFAR python batch (pickled dict with 'data' (N, 3072) uint8 and '{label_key}')"
    raw = _read_bytes(path, what)
    batch = restricted_unpickle(raw, path)
    if not isinstance(batch, dict):
        raise DataFileError(f"{path}: holds a {type(batch).__name__}; expected {what}")
    norm = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in norm or label_key not in norm:
        raise DataFileError(f"{path}: keys {sorted(map(str, norm))}; expected {what}")
    data, labels = norm["data"], norm[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataFileError(f"{path}: 'data' is {type(data).__name__} {shape} {getattr(data, 'dtype', '')}; "
                            f"expected {what}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise DataFileError(f"{path}: '{label_key}' has shape {labels.shape} dtype {labels.dtype}; expected "
                            f"{data.shape[0]} integer labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)
