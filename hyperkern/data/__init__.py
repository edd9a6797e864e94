"""Datasets for the ensemble trainers: the embedded UCI digits, and MNIST / Fashion-MNIST / CIFAR-10 /
CIFAR-100 from a local directory in the layout torchvision writes. Everything is loaded into memory
as float32 image tensors (N, C, H, W) and int64 labels (N,); train / validation / test splits are
fixed by a seed.

The embedded default, hyperkern/data/digits.csv.gz, is the test part of the UCI "Optical Recognition
of Handwritten Digits" data set (E. Alpaydin, C. Kaynak, 1998; 1,797 8x8 images with pixel values
0..16 and the digit as the last column), the same file scikit-learn bundles. It ships with the
package, so the default needs no download.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from hyperkern.data._formats import DataFileError, read_cifar_batch, read_idx, restricted_unpickle

__all__ = [
    "ArrayDataset",
    "DataSplits",
    "DataFileError",
    "DATASETS",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_cifar10",
    "load_cifar100",
    "split_indices",
    "read_idx",
    "read_cifar_batch",
    "restricted_unpickle",
]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")

# per-channel statistics of the CIFAR training sets (pixels scaled to [0, 1])
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass
class ArrayDataset:
    """An in-memory dataset: x (N, C, H, W) float32 images, y (N,) int64 class indices."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError("ArrayDataset x and y must be torch tensors")
        if self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"ArrayDataset needs y of shape (N,) with N = x.shape[0] = {self.x.shape[0]}, "
                             f"got y.shape = {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __iter__(self):  # allows `x, y = dataset`
        return iter((self.x, self.y))

    def subset(self, index) -> "ArrayDataset":
        return ArrayDataset(self.x[index], self.y[index])


@dataclass
class DataSplits:
    """train / val / test splits of one dataset and what a model needs to know about it."""

    name: str
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple  # (C, H, W)

    @property
    def in_channels(self) -> int:
        return int(self.input_shape[0])

    def describe(self) -> str:
        return (f"{self.name}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}, "
                f"input {tuple(self.input_shape)}, {self.num_classes} classes")


def split_indices(n: int, fractions, seed: int) -> list[torch.Tensor]:
    """Randomly partition range(n) into len(fractions) + 1 parts with a generator seeded by seed:
    part i gets round(fractions[i] * n) indices, the last part the rest. Same seed, same parts."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    parts, start = [], 0
    for f in fractions:
        if not 0.0 <= f < 1.0:
            raise ValueError(f"split fractions must lie in [0, 1), got {f}")
        size = int(round(f * n))
        parts.append(perm[start:start + size].sort().values)
        start += size
    if start >= n:
        raise ValueError(f"split fractions {list(fractions)} leave no examples of {n} for the last part")
    parts.append(perm[start:].sort().values)
    return parts


def _check_fraction(name, value):
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    return float(value)


def _digits_array() -> np.ndarray:
    with resources.files("hyperkern.data").joinpath("digits.csv.gz").open("rb") as f:
        text = gzip.decompress(f.read()).decode("ascii")
    table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64)
    if table.shape != (1797, 65):
        raise DataFileError(f"hyperkern/data/digits.csv.gz: table of shape {table.shape}; expected (1797, 65)")
    return table


def load_digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> DataSplits:
    """The embedded UCI digits: 1,797 images 1x8x8 scaled to [0, 1], 10 classes. The test set is
    test_fraction of all images, the validation set val_fraction of all images, drawn by seed."""
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    table = _digits_array()
    x = torch.from_numpy(table[:, :64].astype(np.float32) / 16.0).view(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].copy())
    test_idx, val_idx, train_idx = split_indices(len(y), [test_fraction, val_fraction], seed)
    full = ArrayDataset(x, y)
    return DataSplits("digits", full.subset(train_idx), full.subset(val_idx), full.subset(test_idx), 10, (1, 8, 8))


def _find(data_dir: str, candidates_dirs: list[str], names: list[str], what: str) -> str:
    tried = []
    for d in candidates_dirs:
        for name in names:
            for suffix in ("", ".gz"):
                path = os.path.join(data_dir, d, name + suffix)
                if os.path.isfile(path):
                    return path
                tried.append(path)
    raise DataFileError(f"{what} not found; looked for: {', '.join(tried)}")


def _check_data_dir(data_dir, dataset):
    if data_dir is None:
        raise ValueError(f"data_dir is required for {dataset}: a directory in torchvision's layout "
                         "(hyperkern never downloads; only 'digits' is embedded)")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataFileError(f"{data_dir}: data directory not found (expected a directory holding {dataset} "
                            "in torchvision's layout)")
    return data_dir


def _split_train_val(x, y, val_fraction, seed):
    val_idx, train_idx = split_indices(len(y), [val_fraction], seed)
    full = ArrayDataset(x, y)
    return full.subset(train_idx), full.subset(val_idx)


def _load_idx_dataset(data_dir, folder, name, seed, val_fraction, max_label=9) -> DataSplits:
    data_dir = _check_data_dir(data_dir, name)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    dirs = [os.path.join(folder, "raw"), folder, "raw", ""]
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find(data_dir, dirs, [f"{prefix}-images-idx3-ubyte"], f"{name} {split} images")
        lbl_path = _find(data_dir, dirs, [f"{prefix}-labels-idx1-ubyte"], f"{name} {split} labels")
        images, labels = read_idx(img_path, expected_ndim=3), read_idx(lbl_path, expected_ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise DataFileError(f"{img_path} / {lbl_path}: expected uint8 images and labels, got "
                                f"{images.dtype} and {labels.dtype}")
        if images.shape[0] != labels.shape[0]:
            raise DataFileError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds "
                                f"{labels.shape[0]} labels; expected the same count")
        if labels.size and labels.max() > max_label:
            raise DataFileError(f"{lbl_path}: label {int(labels.max())} out of range; expected 0..{max_label}")
        x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
        arrays[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    train, val = _split_train_val(*arrays["train"], val_fraction, seed)
    h, w = arrays["train"][0].shape[2:]
    return DataSplits(name, train, val, ArrayDataset(*arrays["test"]), max_label + 1, (1, int(h), int(w)))


def load_mnist(data_dir, seed: int = 0, val_fraction: float = 0.1) -> DataSplits:
    """MNIST from data_dir/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (torchvision's
    layout; data_dir/MNIST or data_dir itself holding the files also works). The validation set is
    val_fraction of the official training set, drawn by seed; test is the official test set."""
    return _load_idx_dataset(data_dir, "MNIST", "mnist", seed, val_fraction)


def load_fashion_mnist(data_dir, seed: int = 0, val_fraction: float = 0.1) -> DataSplits:
    """Fashion-MNIST from data_dir/FashionMNIST/raw/... (same file names as MNIST)."""
    return _load_idx_dataset(data_dir, "FashionMNIST", "fashion_mnist", seed, val_fraction)


def _normalize(x_uint8: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(x_uint8.astype(np.float32) / 255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def load_cifar10(data_dir, seed: int = 0, val_fraction: float = 0.1) -> DataSplits:
    """CIFAR-10 from data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch} (torchvision's layout),
    read through a restricted unpickler. Images normalised per channel; validation = val_fraction of
    the training batches, drawn by seed."""
    data_dir = _check_data_dir(data_dir, "cifar10")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    dirs = ["cifar-10-batches-py", ""]
    parts = [read_cifar_batch(_find(data_dir, dirs, [f"data_batch_{i}"], f"CIFAR-10 training batch {i}"), "labels")
             for i in range(1, 6)]
    test = read_cifar_batch(_find(data_dir, dirs, ["test_batch"], "CIFAR-10 test batch"), "labels")
    return _cifar_splits("cifar10", parts, test, 10, _CIFAR10_MEAN, _CIFAR10_STD, seed, val_fraction)


def load_cifar100(data_dir, seed: int = 0, val_fraction: float = 0.1) -> DataSplits:
    """CIFAR-100 (fine labels) from data_dir/cifar-100-python/{train, test} (torchvision's layout)."""
    data_dir = _check_data_dir(data_dir, "cifar100")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    dirs = ["cifar-100-python", ""]
    train = read_cifar_batch(_find(data_dir, dirs, ["train"], "CIFAR-100 training set"), "fine_labels")
    test = read_cifar_batch(_find(data_dir, dirs, ["test"], "CIFAR-100 test set"), "fine_labels")
    return _cifar_splits("cifar100", [train], test, 100, _CIFAR100_MEAN, _CIFAR100_STD, seed, val_fraction)


def _cifar_splits(name, parts, test, num_classes, mean, std, seed, val_fraction):
    for images, labels in parts + [test]:
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataFileError(f"{name}: label out of range [{labels.min()}, {labels.max()}]; "
                                f"expected 0..{num_classes - 1}")
    x = _normalize(np.concatenate([p[0] for p in parts]), mean, std)
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    train, val = _split_train_val(x, y, val_fraction, seed)
    test_ds = ArrayDataset(_normalize(test[0], mean, std), torch.from_numpy(test[1]))
    return DataSplits(name, train, val, test_ds, num_classes, (3, 32, 32))


def load_dataset(name: str = "digits", data_dir=None, seed: int = 0, val_fraction: float = 0.1) -> DataSplits:
    """Load one of DATASETS ("digits" is embedded; the others read data_dir, never download)."""
    key = str(name).lower().replace("-", "_")
    if key == "digits":
        return load_digits(seed=seed, val_fraction=val_fraction)
    loaders = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "fashionmnist": load_fashion_mnist,
               "cifar10": load_cifar10, "cifar_10": load_cifar10, "cifar100": load_cifar100,
               "cifar_100": load_cifar100}
    if key not in loaders:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return loaders[key](data_dir, seed=seed, val_fraction=val_fraction)
