"""The 15 common corruptions of Hendrycks & Dietterich (2019) at severities 1-5, applied to a test split.

The corruption math is the imagecorruptions-imaug library's (the maintained fork of bethgelab's
imagecorruptions, itself Hendrycks' code generalised to any image size and to greyscale; no
ImageMagick). hyperkern only converts images to the library's uint8 pixels and back, seeds it, and
caches the results:

- pixels: a split's float images (N, C, H, W) are mapped back to pixel values 0..255 by the dataset's
  normalisation (digits, MNIST and Fashion-MNIST hold pixel / max; CIFAR is normalised per channel),
  corrupted as (H, W, 3) uint8 images (a greyscale image is repeated into three channels, as the
  library's corrupt() does, and the result turned back to grey with the library's own luma weights),
  and normalised again.
- seeds: image i under corruption j at severity s is corrupted after seeding numpy's global generator
  (and the seed argument of glass_blur and impulse_noise, which do not use it) with a seed drawn from
  SeedSequence([seed, j, s, i]): the result does not depend on which other images, corruptions or
  severities run, nor on their order.
- sizes: the library runs every corruption at 8x8, 28x28 and 32x32. A corruption that leaves every
  image unchanged at a size is skipped and reported; one that applies only in part is reported too
  (glass_blur's local pixel shuffle needs images larger than twice its largest shift).
- cache: CorruptionCache stores each (corruption, severity) as a uint8 .npy file in a directory keyed
  by everything that decides it (library version, dataset, seed, the clean pixels), written
  atomically and read with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

__all__ = ["CORRUPTIONS", "CORRUPTION_GROUPS", "SEVERITIES", "LIBRARY", "library_version", "check_severities",
           "check_corruptions", "PixelCodec", "pixel_codec", "corrupt_images", "size_notes", "CorruptionCache"]

LIBRARY = "imagecorruptions-imaug"
LIBRARY_PIN = "1.1.5"

CORRUPTION_GROUPS = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS = tuple(name for group in CORRUPTION_GROUPS.values() for name in group)
SEVERITIES = (1, 2, 3, 4, 5)

# glass_blur's (sigma, max_delta, iterations) per severity in the pinned library: its local shuffle
# visits rows and columns max_delta < i <= size - max_delta, none when size <= 2 * max_delta.
_GLASS_BLUR_MAX_DELTA = (1, 2, 2, 3, 4)
_SEEDED_BY_ARGUMENT = ("glass_blur", "impulse_noise")
_LUMA = np.array([0.2989, 0.5870, 0.1140])  # the library's rgb2gray weights


def library_version() -> str | None:
    """The installed version of the corruption library, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(LIBRARY)
    except metadata.PackageNotFoundError:
        return None


def _import_library():
    try:
        import imagecorruptions
    except ImportError as exc:
        raise ImportError(f"corrupting images needs the {LIBRARY} library, which could not be imported ({exc}); "
                          'install it with: pip install "hyperkern[robustness]" (it imports OpenCV, which needs '
                          "libGL on Linux)") from exc
    return imagecorruptions


def check_severities(severities) -> tuple[int, ...]:
    """Sorted distinct severities, each an integer in 1..5; a ValueError names any other value."""
    out = []
    for s in severities:
        if isinstance(s, str):
            try:
                s = int(s.strip())
            except ValueError:
                raise ValueError(f"severities must be integers in 1..5, got {s!r}") from None
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= int(s) <= 5:
            raise ValueError(f"severities must be integers in 1..5 (Hendrycks & Dietterich's levels), got {s!r}")
        out.append(int(s))
    if not out:
        raise ValueError("at least one severity in 1..5 is needed")
    return tuple(sorted(set(out)))


def check_corruptions(names) -> tuple[str, ...]:
    """Distinct corruption names in CORRUPTIONS order; a group name (noise, blur, weather, digital)
    stands for its four (or three) corruptions. A ValueError names any unknown name."""
    wanted = set()
    for name in names:
        key = str(name).strip().lower().replace("-", "_")
        if key in CORRUPTION_GROUPS:
            wanted.update(CORRUPTION_GROUPS[key])
        elif key in CORRUPTIONS:
            wanted.add(key)
        else:
            raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)} or a group "
                             f"({', '.join(CORRUPTION_GROUPS)})")
    if not wanted:
        raise ValueError("at least one corruption is needed")
    return tuple(c for c in CORRUPTIONS if c in wanted)


class PixelCodec:
    """Maps a dataset's float images (N, C, H, W) to uint8 pixels (N, H, W, C) and back: pixel / 255 =
    x * std + mean per channel."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_pixels(self, x: torch.Tensor) -> np.ndarray:
        unit = (x.detach().cpu().float() * self.std + self.mean).clamp(0.0, 1.0)
        return (unit * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    def from_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self.mean) / self.std).contiguous()


def pixel_codec(dataset: str, channels: int) -> PixelCodec:
    """The normalisation of hyperkern.data's loaders: CIFAR per-channel statistics, else pixel / max."""
    from hyperkern import data

    key = str(dataset).lower().replace("-", "_")
    if key in ("cifar10", "cifar_10"):
        return PixelCodec(data._CIFAR10_MEAN, data._CIFAR10_STD)
    if key in ("cifar100", "cifar_100"):
        return PixelCodec(data._CIFAR100_MEAN, data._CIFAR100_STD)
    return PixelCodec((0.0,) * channels, (1.0,) * channels)


def _image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, CORRUPTIONS.index(corruption), int(severity), int(index)])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def corrupt_images(pixels: np.ndarray, corruption: str, severity: int, seed: int = 0, indices=None) -> np.ndarray:
    """Corrupt uint8 images (N, H, W, C), C = 1 or 3, with one corruption at one severity (1..5); returns
    uint8 (N, H, W, C). indices: each image's index in its split (default 0..N-1), which picks its
    seed, so a subset gets the same corrupted images as the whole split."""
    lib = _import_library()
    (corruption,) = check_corruptions([corruption])
    (severity,) = check_severities([severity])
    if (not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 4
            or pixels.shape[3] not in (1, 3)):
        raise ValueError(f"pixels must be uint8 (N, H, W, C) with C = 1 or 3, got "
                         f"{getattr(pixels, 'dtype', type(pixels).__name__)} {getattr(pixels, 'shape', '')}")
    indices = np.arange(pixels.shape[0]) if indices is None else np.asarray(indices)
    if indices.shape != (pixels.shape[0],):
        raise ValueError(f"indices must have shape ({pixels.shape[0]},), got {indices.shape}")
    from PIL import Image

    function = lib.corruption_dict[corruption]
    grey = pixels.shape[3] == 1
    out = np.empty_like(pixels)
    state = np.random.get_state()
    try:
        import cv2

        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # images of a few hundred pixels: threads only cost here
    except ImportError:  # pragma: no cover - the library needs cv2
        cv2 = None
    try:
        for row, (image, index) in enumerate(zip(pixels, indices)):
            rgb = np.repeat(image, 3, axis=2) if grey else image
            image_seed = _image_seed(seed, corruption, severity, int(index))
            np.random.seed(image_seed)
            kwargs = {"seed": image_seed} if corruption in _SEEDED_BY_ARGUMENT else {}
            result = np.asarray(function(Image.fromarray(rgb), severity, **kwargs))
            result = np.uint8(result)  # what the library's corrupt() returns (truncation included)
            if result.ndim == 2:
                result = result[..., None]
            if grey and result.shape[2] >= 3:  # back to grey with the library's luma weights
                result = np.clip(np.round(result[..., :3].astype(np.float64) @ _LUMA), 0, 255)[..., None]
            elif grey:
                result = result[..., :1]
            elif result.shape[2] == 1:
                result = np.repeat(result, 3, axis=2)
            out[row] = result.astype(np.uint8)
    finally:
        np.random.set_state(state)
        if cv2 is not None:
            cv2.setNumThreads(threads)
    return out


def size_notes(corruption: str, severity: int, height: int, width: int) -> str | None:
    """A note when the corruption applies only in part at this image size, else None."""
    if corruption == "glass_blur":
        delta = _GLASS_BLUR_MAX_DELTA[severity - 1]
        if min(height, width) <= 2 * delta:
            return (f"glass_blur severity {severity} at {height}x{width}: its local pixel shuffle (shifts up to "
                    f"{delta} pixels) reaches no pixel of so small an image; only its Gaussian blur applies")
    return None


class CorruptionCache:
    """Corrupted copies of one split's images, one uint8 .npy file (N, H, W, C) per corruption and
    severity, under ROOT/<key>/, where key hashes what decides them: the corruption source (library
    and version), the dataset name, the seed and the clean pixels with their split indices."""

    def __init__(self, root: str | None, source: str, dataset: str, seed: int, pixels: np.ndarray, indices):
        h = hashlib.sha256()
        h.update(json.dumps({"source": source, "dataset": dataset, "seed": int(seed),
                             "shape": list(pixels.shape)}, sort_keys=True).encode())
        h.update(np.ascontiguousarray(pixels).tobytes())
        h.update(np.ascontiguousarray(np.asarray(indices, dtype=np.int64)).tobytes())
        self.key = h.hexdigest()[:20]
        self.shape = tuple(pixels.shape)
        self.path = None if root is None else os.path.join(os.fspath(root), self.key)
        self.notes: list[str] = []
        if self.path is not None:
            os.makedirs(self.path, exist_ok=True)
            ident = os.path.join(self.path, "identity.json")
            if not os.path.exists(ident):
                tmp = f"{ident}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump({"source": source, "dataset": dataset, "seed": int(seed), "shape": list(pixels.shape)},
                              f, indent=1)
                os.replace(tmp, ident)

    def _file(self, corruption: str, severity: int) -> str:
        return os.path.join(self.path, f"{corruption}-{severity}.npy")

    def get(self, corruption: str, severity: int) -> np.ndarray | None:
        if self.path is None or not os.path.isfile(self._file(corruption, severity)):
            return None
        path = self._file(corruption, severity)
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            self.notes.append(f"{path}: unreadable cache file ({type(exc).__name__}: {exc}); recomputed")
            return None
        if array.dtype != np.uint8 or tuple(array.shape) != self.shape:
            self.notes.append(f"{path}: cache file holds {array.dtype} {array.shape}, expected uint8 {self.shape}; "
                              "recomputed")
            return None
        return array

    def put(self, corruption: str, severity: int, array: np.ndarray) -> None:
        if self.path is None:
            return
        path = self._file(corruption, severity)
        tmp = f"{path}.tmp-{os.getpid()}.npy"
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
