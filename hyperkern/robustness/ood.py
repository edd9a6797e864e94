"""Out-of-distribution splits: images the models never saw a class of, to be told apart from the
in-distribution test split by an uncertainty score.

- noise: uniform pixel noise, one image per test image (seeded).
- scrambled: each test image with its pixel positions randomly permuted (seeded): the same intensities,
  corrupted beyond recognition.
- mnist, fashion_mnist, cifar10, cifar100: that dataset's test split, read from --ood-data-dir (else
  --data-dir) by hyperkern.data's loaders and put through the in-distribution normalisation.
- svhn: the SVHN test set (test_32x32.mat) from the same directory.
- a path ending in .npy: uint8 images (N, H, W) or (N, H, W, C), read with allow_pickle=False.

"auto" (the default) is noise and scrambled, plus the natural pair of the dataset when its files are
found (Fashion-MNIST / MNIST against each other, CIFAR-10 against CIFAR-100 and SVHN and the reverse);
what it could not find is reported, never dropped silently. An OOD split whose images differ in size or
channel count from what the models take is a ValueError saying both shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from hyperkern.robustness.corruptions import pixel_codec

__all__ = ["OODSplit", "OOD_CHOICES", "NATURAL_PAIRS", "parse_ood", "check_ood_shapes", "build_ood_splits"]

_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
OOD_CHOICES = ("auto", "none", "noise", "scrambled", *_DATASETS, "svhn")
_KNOWN_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
                 "svhn": (3, 32, 32)}
NATURAL_PAIRS = {"mnist": ("fashion_mnist",), "fashion_mnist": ("mnist",), "cifar10": ("cifar100", "svhn"),
                 "cifar100": ("cifar10", "svhn")}


@dataclass
class OODSplit:
    name: str
    description: str
    x: torch.Tensor  # (N, C, H, W) in the in-distribution normalisation


def parse_ood(text) -> list[str]:
    """The --ood value as a list of split names (a .npy path is kept as given); ValueError on others."""
    items = [t.strip() for t in (text if isinstance(text, (list, tuple)) else str(text).split(",")) if t.strip()]
    if not items:
        raise ValueError("--ood needs at least one split (or none)")
    out = []
    for item in items:
        key = item.lower().replace("-", "_")
        if item.lower().endswith(".npy"):
            out.append(item)
        elif key in OOD_CHOICES:
            out.append(key)
        else:
            raise ValueError(f"unknown OOD split {item!r}; choose from {', '.join(OOD_CHOICES)} or a .npy file of "
                             "uint8 images")
    if "none" in out and len(out) > 1:
        raise ValueError("--ood none cannot be combined with other splits")
    return out


def _check_shape(name: str, x: torch.Tensor, input_shape) -> torch.Tensor:
    if tuple(x.shape[1:]) != tuple(input_shape):
        c, h, w = input_shape
        raise ValueError(f"OOD split {name!r} has images of shape {tuple(x.shape[1:])} (channels, height, width); "
                         f"the models take {tuple(input_shape)} ({c} channel{'s' if c != 1 else ''}, {h}x{w}): an "
                         "OOD split must have the same image size and channel count")
    return x


def check_ood_shapes(names, input_shape) -> None:
    """Refuse, before anything is trained or read, a named OOD dataset whose image shape is known and
    differs from input_shape, and a .npy file of another shape or dtype."""
    for name in parse_ood(names):
        if name in _KNOWN_SHAPES and tuple(_KNOWN_SHAPES[name]) != tuple(input_shape):
            _check_shape(name, torch.empty((0, *_KNOWN_SHAPES[name])), input_shape)
        elif name.lower().endswith(".npy"):
            from hyperkern.data.corrupted import read_image_array

            pixels = read_image_array(name)
            _check_shape(os.path.basename(name), torch.empty((0, pixels.shape[3], *pixels.shape[1:3])), input_shape)


def _dataset_split(name: str, directory, seed: int, codec, input_shape) -> OODSplit:
    from hyperkern.data import load_dataset

    if tuple(_KNOWN_SHAPES[name]) != tuple(input_shape):  # refused before any file is read
        _check_shape(name, torch.empty((0, *_KNOWN_SHAPES[name])), input_shape)
    if name == "svhn":
        from hyperkern.data.corrupted import read_svhn_test

        pixels, _ = read_svhn_test(directory)
        source = "SVHN test set"
    else:
        test = load_dataset(name, data_dir=directory, seed=seed, val_fraction=0.1).test
        _check_shape(name, test.x, input_shape)
        pixels = pixel_codec(name, test.x.shape[1]).to_pixels(test.x)
        source = f"{name} test split"
    if pixels.shape[3] != input_shape[0] or pixels.shape[1:3] != tuple(input_shape[1:]):
        _check_shape(name, torch.empty((1, pixels.shape[3], *pixels.shape[1:3])), input_shape)
    return OODSplit(name, f"{source} ({pixels.shape[0]} images from {directory})", codec.from_pixels(pixels))


def build_ood_splits(names, *, dataset: str, test_x: torch.Tensor, input_shape, data_dir=None, ood_data_dir=None,
                     seed: int = 0, log=print) -> tuple[list[OODSplit], list[str]]:
    """The OOD splits named (see the module doc), each (N, C, H, W) in the in-distribution
    normalisation; returns (splits, notes), notes saying what "auto" looked for and did not find."""
    names = parse_ood(names)
    if names == ["none"]:
        return [], []
    codec = pixel_codec(dataset, int(input_shape[0]))
    directory = ood_data_dir if ood_data_dir is not None else data_dir
    auto = "auto" in names
    wanted = [n for n in names if n != "auto"]
    if auto:
        for n in ("noise", "scrambled", *NATURAL_PAIRS.get(dataset, ())):
            if n not in wanted:
                wanted.append(n)
    rng_seed = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x00D])
    rng = np.random.default_rng(rng_seed)
    clean = codec.to_pixels(test_x)
    splits, notes = [], []
    for name in wanted:
        if name == "noise":
            pixels = rng.integers(0, 256, size=clean.shape, dtype=np.uint8)
            splits.append(OODSplit("noise", f"uniform pixel noise ({clean.shape[0]} images)",
                                   codec.from_pixels(pixels)))
        elif name == "scrambled":
            flat = clean.reshape(clean.shape[0], -1, clean.shape[3])
            perm = np.argsort(rng.random(flat.shape[:2]), axis=1)
            pixels = np.take_along_axis(flat, perm[..., None], axis=1).reshape(clean.shape)
            splits.append(OODSplit("scrambled", f"test images with their pixels randomly permuted "
                                               f"({clean.shape[0]} images)", codec.from_pixels(pixels)))
        elif name.lower().endswith(".npy"):
            from hyperkern.data.corrupted import read_image_array

            pixels = read_image_array(name)
            x = codec.from_pixels(pixels) if pixels.shape[3] == input_shape[0] else \
                torch.empty((pixels.shape[0], pixels.shape[3], *pixels.shape[1:3]))
            _check_shape(os.path.basename(name), x, input_shape)
            splits.append(OODSplit(os.path.basename(name), f"{name} ({pixels.shape[0]} images)", x))
        else:
            if name == dataset:
                raise ValueError(f"OOD split {name!r} is the in-distribution dataset itself")
            if auto and name not in names:
                try:
                    splits.append(_dataset_split(name, directory, seed, codec, input_shape))
                except (OSError, ValueError, ImportError) as exc:  # DataFileError is a ValueError
                    notes.append(f"OOD split {name} (auto) not used: {exc}")
            else:
                splits.append(_dataset_split(name, directory, seed, codec, input_shape))
    for note in notes:
        log(f"hyperkern: {note}")
    return splits, notes
