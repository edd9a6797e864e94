"""Readers for the files of robustness evaluation: the corrupted test sets CIFAR-10-C / CIFAR-100-C
(Hendrycks & Dietterich, 2019), the SVHN test set as an out-of-distribution split, and a plain .npy
array of images. All follow the data module's rules: nothing is unpickled (numpy files are read with
allow_pickle=False, MATLAB files by scipy's reader, which builds arrays only), shapes and dtypes are
checked before use, and every problem is a DataFileError naming the file.

CIFAR-10-C layout (the published archive, unpacked):
    DATA_DIR/CIFAR-10-C/<corruption>.npy   (50000, 32, 32, 3) uint8: severities 1..5 one after the
                                            other, each the 10,000 CIFAR-10 test images in order
    DATA_DIR/CIFAR-10-C/labels.npy          (50000,) integer labels (the test labels five times)
and CIFAR-100-C the same under DATA_DIR/CIFAR-100-C.
"""
from __future__ import annotations

import os

import numpy as np

from hyperkern.data._formats import DataFileError

__all__ = ["CORRUPTED_DIRS", "find_corrupted_dir", "read_corrupted_labels", "read_corrupted", "read_svhn_test",
           "read_image_array"]

CORRUPTED_DIRS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
_SEVERITIES = 5


def find_corrupted_dir(data_dir, dataset: str) -> str | None:
    """DATA_DIR/CIFAR-10-C (cifar10) or DATA_DIR/CIFAR-100-C (cifar100) when that directory exists, else
    None (also for datasets without published corrupted files)."""
    name = CORRUPTED_DIRS.get(dataset)
    if data_dir is None or name is None:
        return None
    path = os.path.join(os.fspath(data_dir), name)
    return path if os.path.isdir(path) else None


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataFileError(f"{path}: file not found (expected {what})")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as exc:  # ValueError (pickled object arrays, bad header), OSError, EOFError
        raise DataFileError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc}); expected "
                            f"{what}") from exc


def read_corrupted_labels(directory: str, test_labels: np.ndarray) -> None:
    """Check DIRECTORY/labels.npy against the test split: the test labels once per severity, in order.
    A different file (another dataset, a shuffled or truncated copy) is a DataFileError."""
    n = int(test_labels.shape[0])
    path = os.path.join(directory, "labels.npy")
    what = f"({_SEVERITIES * n},) integer labels: the {n} test labels once per severity"
    labels = _load_npy(path, what)
    if labels.ndim != 1 or labels.shape[0] != _SEVERITIES * n or labels.dtype.kind not in "iu":
        raise DataFileError(f"{path}: array of shape {labels.shape} and dtype {labels.dtype}; expected {what}")
    if not np.array_equal(np.asarray(labels, dtype=np.int64), np.tile(np.asarray(test_labels, np.int64), _SEVERITIES)):
        raise DataFileError(f"{path}: labels differ from the test split's; expected {what} (are these the "
                            "corrupted files of this dataset's official test set?)")


def read_corrupted(directory: str, corruption: str, severity: int, n: int, image_shape: tuple) -> np.ndarray:
    """The n corrupted test images of one corruption at one severity (1..5) from
    DIRECTORY/<corruption>.npy, as (n, H, W, C) uint8. image_shape: (C, H, W) of the clean images."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= _SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..{_SEVERITIES}, got {severity!r}")
    c, h, w = (int(v) for v in image_shape)
    path = os.path.join(directory, f"{corruption}.npy")
    expected = (_SEVERITIES * n, h, w, c)
    what = f"a uint8 array of shape {expected} (severities 1..5 of the {n} test images, height x width x channels)"
    array = _load_npy(path, what)
    if array.dtype != np.uint8 or array.shape != expected:
        raise DataFileError(f"{path}: array of shape {array.shape} and dtype {array.dtype}; expected {what}")
    return np.array(array[(severity - 1) * n: severity * n])


def read_image_array(path: str) -> np.ndarray:
    """A .npy file of images (N, H, W) or (N, H, W, C) uint8 in 0..255, as (N, H, W, C) uint8; read with
    allow_pickle=False."""
    what = "a uint8 array of images (N, H, W) or (N, H, W, C) with pixel values 0..255"
    array = _load_npy(os.fspath(path), what)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[0] < 1:
        raise DataFileError(f"{path}: array of shape {array.shape} and dtype {array.dtype}; expected {what}")
    array = np.array(array)
    return array[..., None] if array.ndim == 3 else array


def read_svhn_test(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """The SVHN test set from DATA_DIR/test_32x32.mat (torchvision's layout; DATA_DIR/svhn or
    DATA_DIR/SVHN holding it also works), as images (N, 32, 32, 3) uint8 and labels (N,) in 0..9 (the
    file's 10 is the digit 0). Needs scipy (the robustness extra)."""
    if data_dir is None:
        raise ValueError("the SVHN out-of-distribution split needs --data-dir (or --ood-data-dir): a directory "
                         "holding test_32x32.mat")
    tried = [os.path.join(os.fspath(data_dir), d, "test_32x32.mat") for d in ("", "svhn", "SVHN")]
    path = next((p for p in tried if os.path.isfile(p)), None)
    if path is None:
        raise DataFileError(f"SVHN test set not found; looked for: {', '.join(tried)}")
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError('reading SVHN needs scipy: pip install "hyperkern[robustness]"') from exc
    what = "a MATLAB file with X (32, 32, 3, N) uint8 and y (N, 1) labels 1..10"
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as exc:
        raise DataFileError(f"{path}: unreadable MATLAB file ({type(exc).__name__}: {exc}); expected {what}") from exc
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataFileError(f"{path}: X is {getattr(x, 'shape', None)} {getattr(x, 'dtype', type(x).__name__)}; "
                            f"expected {what}")
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iuf" or y.size != x.shape[3]:
        raise DataFileError(f"{path}: y is {getattr(y, 'shape', None)}; expected {what}")
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataFileError(f"{path}: labels in [{labels.min()}, {labels.max()}]; expected {what}")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels % 10
