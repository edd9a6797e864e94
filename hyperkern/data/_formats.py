"""Readers for the on-disk formats of the datasets, each strict about what it accepts.

- IDX (MNIST, Fashion-MNIST): big-endian header, raw or gzip-compressed.
- CIFAR-10/100 python batches: pickled dicts, read through a restricted unpickler that can build
  only the containers, bytes and numpy arrays those files hold. Nothing else is importable while
  unpickling, so a hostile file cannot run code; it is refused with an error naming the path.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np

__all__ = ["read_idx", "read_cifar_batch", "restricted_unpickle", "DataFileError"]


class DataFileError(ValueError):
    """A data file is missing, truncated, corrupt or not in the expected format."""


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str, what: str) -> bytes:
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: file not found (expected {what})")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataFileError(f"{path}: corrupt gzip stream ({exc}); expected {what}") from exc
    return raw


def read_idx(path: str, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed or not) into a numpy array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; then the data, big-endian, C order. The file must hold exactly that many bytes.
    """
    what = f"an IDX file{'' if expected_ndim is None else f' with {expected_ndim} dimensions'} (MNIST format)"
    raw = _read_bytes(path, what)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; expected {what} "
                            "starting with 00 00 <type code 08/09/0b/0c/0d/0e> <ndim>")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataFileError(f"{path}: IDX file has {ndim} dimensions; expected {what}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path}: truncated IDX header ({len(raw)} bytes); expected {what}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected_bytes = header + count * dtype.itemsize
    if len(raw) != expected_bytes:
        raise DataFileError(f"{path}: IDX header announces shape {shape} of {dtype.name} ({expected_bytes} bytes "
                            f"in all) but the file holds {len(raw)} bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


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


def _check_plain(obj, depth=0):
    """Only containers, scalars, bytes/str and numeric numpy arrays may come out of a data file."""
    if depth > 8:
        raise pickle.UnpicklingError("data file nests containers too deeply")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, depth + 1)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise pickle.UnpicklingError(f"numpy array of dtype {obj.dtype} is not allowed in a data file")
    elif not isinstance(obj, (bytes, str, int, float, bool, type(None))):
        raise pickle.UnpicklingError(f"object of type {type(obj).__name__} is not allowed in a data file")


def restricted_unpickle(data: bytes, path: str = "<bytes>"):
    """Unpickle data admitting only dict/list/tuple, bytes/str, numbers and numpy arrays (numeric
    dtypes). Python-2 strings load as bytes (encoding="bytes"), as in the CIFAR python batches.
    Anything else, e.g. a global that would run code, raises DataFileError naming path."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        _check_plain(obj)
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
