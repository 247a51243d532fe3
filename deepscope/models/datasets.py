"""Image classification datasets: built-ins, MNIST-format idx directories and ``.npz`` files.

Every dataset is returned as a :class:`Dataset` of float32 images in [0, 1], shaped
(N, C, H, W), with int64 labels. Loaded datasets are cached in-process (parsing Fashion-MNIST
takes about a second); the cached tensors are shared, so do not modify them in place.
"""

from __future__ import annotations

import functools
import gzip
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from deepscope.catalog import BUILTIN_DATASETS, FASHION_MNIST_CLASSES

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "Dataset",
    "channel_stats",
    "class_averages",
    "class_indices",
    "load_dataset",
    "read_idx",
]

Split = Literal["train", "test"]

FASHION_MNIST_ENV = "DEEPSCOPE_FASHION_MNIST_DIR"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_SPLITS: tuple[str, ...] = ("train", "test")
# MNIST-format file stems per split; both the ``-idx3-`` and the ``.idx3-`` spellings occur.
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_TYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


@dataclass(frozen=True)
class Dataset:
    """A labelled image set.

    ``images``: (N, C, H, W) float32 in [0, 1]; ``labels``: (N,) int64 in
    ``[0, len(class_names))``.
    """

    name: str
    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------------------------
# idx files


def read_idx(path: Path) -> NDArray[np.generic]:
    """Parse one MNIST-format idx file (gzipped if its name ends in ``.gz``).

    Layout: two zero bytes, a dtype code, the number of dimensions, then each dimension as a
    big-endian uint32, then the data, big-endian. ``ValueError`` on a bad header or length.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read idx file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown idx data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: idx file with zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: idx header says {dims} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, split: str, kind: Literal["images", "labels"]) -> Path | None:
    prefix = _IDX_PREFIX[split]
    rank = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = directory / f"{prefix}-{kind}{sep}idx{rank}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _idx_labels(path: Path) -> NDArray[np.int64]:
    labels = read_idx(path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be a 1-d integer idx array, got {labels.shape}")
    return labels.astype(np.int64)


def _load_idx_dir(directory: Path, split: str, *, fashion: bool) -> tuple[Tensor, Tensor, int]:
    images_path = _find_idx(directory, split, "images")
    labels_path = _find_idx(directory, split, "labels")
    if images_path is None or labels_path is None:
        prefix = _IDX_PREFIX[split]
        missing = f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
        if fashion:
            raise ValueError(
                f"Fashion-MNIST not found: looked for {missing} in {directory}; install the "
                f"Debian package dataset-fashion-mnist or set {FASHION_MNIST_ENV} to a directory "
                "holding the idx files"
            )
        raise ValueError(f"{directory} is not an MNIST-format directory: no {missing}")
    images = _images_to_tensor(read_idx(images_path), str(images_path))
    labels = _idx_labels(labels_path)
    if len(labels) != images.shape[0]:
        raise ValueError(
            f"{directory}: {images.shape[0]} images but {len(labels)} labels in the {split} split"
        )
    # The class count comes from both splits, so train and test agree even when a class is
    # missing from one of them.
    top = int(labels.max(initial=-1))
    other = "test" if split == "train" else "train"
    other_labels = _find_idx(directory, other, "labels")
    if other_labels is not None:
        top = max(top, int(_idx_labels(other_labels).max(initial=-1)))
    _check_labels(labels, str(labels_path))
    return images, torch.from_numpy(labels), top + 1


# --------------------------------------------------------------------------------------------
# conversion and checks


def _images_to_tensor(images: NDArray[np.generic], where: str) -> Tensor:
    """uint8 → /255, float → as is (must lie in [0, 1]); (N, H, W) gains a channel axis."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim != 4:
        raise ValueError(
            f"{where}: images must be (N, H, W) or (N, C, H, W), got shape {images.shape}"
        )
    if images.shape[0] == 0 or any(d == 0 for d in images.shape[1:]):
        raise ValueError(f"{where}: empty images array of shape {images.shape}")
    if images.dtype == np.uint8:
        return torch.from_numpy(images.astype(np.float32) / np.float32(255.0))
    if images.dtype.kind == "f":
        arr = images.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{where}: images contain NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{where}: float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]"
            )
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise ValueError(
        f"{where}: images must be uint8 (0..255) or float in [0, 1], got {images.dtype}"
    )


def _check_labels(labels: NDArray[np.int64], where: str) -> None:
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"{where}: labels must be non-negative, got {int(labels.min())}")


# --------------------------------------------------------------------------------------------
# built-ins and .npz


def _load_digits(split: str) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    # Upscale 8×8 → 28×28 so the digits fit the paper's 28×28 networks.
    big = F.interpolate(
        images[torch.from_numpy(idx)],
        size=(28, 28),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    ).clamp_(0.0, 1.0)
    return big.contiguous(), torch.from_numpy(labels[idx]), tuple(str(i) for i in range(10))


def _npz_array(data: np.lib.npyio.NpzFile, key: str, path: Path) -> NDArray[np.generic]:
    try:
        return np.asarray(data[key])
    except ValueError as exc:  # object arrays refuse to load without pickle
        raise ValueError(f"{path}: cannot read {key!r} without pickle: {exc}") from None


def _npz_labels(arr: NDArray[np.generic], key: str, path: Path) -> NDArray[np.int64]:
    if arr.ndim != 1:
        raise ValueError(f"{path}: {key!r} must be 1-d (N,), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{path}: {key!r} must be integers, got dtype {arr.dtype}")
    labels = arr.astype(np.int64)
    _check_labels(labels, f"{path}: {key!r}")
    return labels


def _load_npz(path: Path, split: str) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read {path} as .npz: {exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive with images/labels")
    with data:
        keys = set(data.files)
        for required in ("images", "labels"):
            if required not in keys:
                raise ValueError(
                    f"{path}: missing key {required!r} (has: {', '.join(sorted(keys)) or 'none'})"
                )
        if ("images_test" in keys) != ("labels_test" in keys):
            raise ValueError(f"{path}: 'images_test' and 'labels_test' must come together")
        has_test = "images_test" in keys
        use_test = split == "test" and has_test
        ikey, lkey = ("images_test", "labels_test") if use_test else ("images", "labels")
        images = _images_to_tensor(_npz_array(data, ikey, path), f"{path}: {ikey!r}")
        labels = _npz_labels(_npz_array(data, lkey, path), lkey, path)
        if len(labels) != images.shape[0]:
            raise ValueError(
                f"{path}: {images.shape[0]} images in {ikey!r} but {len(labels)} labels in {lkey!r}"
            )
        top = int(labels.max(initial=-1))
        if has_test:
            other = "labels" if lkey == "labels_test" else "labels_test"
            top = max(
                top, int(_npz_labels(_npz_array(data, other, path), other, path).max(initial=-1))
            )
        if "class_names" in keys:
            names_arr = _npz_array(data, "class_names", path)
            if names_arr.ndim != 1 or names_arr.dtype.kind not in "US":
                raise ValueError(
                    f"{path}: 'class_names' must be a 1-d string array, got {names_arr.dtype} "
                    f"of shape {names_arr.shape}"
                )
            names = tuple(
                n.decode() if isinstance(n, bytes) else str(n) for n in names_arr.tolist()
            )
            if len(names) <= top:
                raise ValueError(f"{path}: {len(names)} class_names but labels go up to {top}")
        else:
            names = tuple(str(i) for i in range(top + 1))
    return images, torch.from_numpy(labels), names


# --------------------------------------------------------------------------------------------
# the entry point


@functools.lru_cache(maxsize=8)
def _load_cached(kind: str, location: str, split: str, stamp: int) -> Dataset:
    # ``stamp`` (the file's mtime) is only part of the cache key: a rewritten file reloads.
    del stamp
    if kind == "digits":
        images, labels, names = _load_digits(split)
        return Dataset("digits", images, labels, names)
    if kind == "fashion-mnist":
        images, labels, k = _load_idx_dir(Path(location), split, fashion=True)
        if k > len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{location}: Fashion-MNIST labels go up to {k - 1}, expected 0..9")
        return Dataset("fashion-mnist", images, labels, FASHION_MNIST_CLASSES)
    path = Path(location)
    if kind == "idx":
        images, labels, k = _load_idx_dir(path, split, fashion=False)
        return Dataset(path.name, images, labels, tuple(str(i) for i in range(k)))
    if kind == "png":
        return Dataset(path.stem, _load_png(path), torch.zeros(1, dtype=torch.int64), ("image",))
    images, labels, names = _load_npz(path, split)
    return Dataset(path.stem, images, labels, names)


#: A PNG above this many pixels is refused before decoding (a decompression bomb).
MAX_PNG_PIXELS = 4096 * 4096


def _load_png(path: Path) -> Tensor:
    """One PNG as (1, C, H, W) in [0, 1]: C = 1 for grayscale modes, 3 for color."""
    from PIL import Image, UnidentifiedImageError

    try:
        opened = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a readable image") from None
    with opened as img:
        if img.format != "PNG":
            raise ValueError(f"{path}: not a PNG file")
        if img.width * img.height > MAX_PNG_PIXELS:
            raise ValueError(f"{path}: {img.width}×{img.height} pixels is over the limit")
        gray = img.mode in ("1", "L", "LA", "I", "I;16", "F")
        arr = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
    chw = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(chw))[None]


def _stamp(path: Path) -> int:
    """Latest modification time of ``path`` or, for a directory, of it and its files."""
    try:
        stamps = [path.stat().st_mtime_ns]
        if path.is_dir():
            stamps += [p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()]
    except OSError:
        return 0
    return max(stamps)


def load_dataset(
    name_or_path: str,
    split: Split = "train",
    *,
    fashion_mnist_dir: Path | None = None,
) -> Dataset:
    """Load a dataset split.

    * ``digits``: scikit-learn's 8×8 digits scaled to [0, 1], resized to 1×28×28 (bilinear,
      antialiased), stratified 80/20 train/test split with seed 0;
    * ``fashion-mnist``: idx files from ``fashion_mnist_dir``, else
      ``$DEEPSCOPE_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``;
    * an existing directory: MNIST-format idx files (``train-images-idx3-ubyte[.gz]``, ...);
    * an ``.npz`` file with ``images`` (N, H, W) or (N, C, H, W) and ``labels`` (N,), optional
      ``class_names`` and ``images_test``/``labels_test`` (else the file serves both splits);
    * a ``.png`` file: one image (grayscale → 1 channel, color → 3), label 0, for caricatures
      and inversions of a picture of one's own.

    ``ValueError`` with a one-line reason for anything else.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(_SPLITS)}")
    if name_or_path == "digits":
        return _load_cached("digits", "", split, 0)
    if name_or_path == "fashion-mnist":
        env = os.environ.get(FASHION_MNIST_ENV)
        directory = fashion_mnist_dir or (Path(env) if env else DEFAULT_FASHION_MNIST_DIR)
        directory = directory.expanduser().resolve()
        return _load_cached("fashion-mnist", str(directory), split, _stamp(directory))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return _load_cached("idx", str(resolved), split, _stamp(resolved))
    if path.is_file():
        kinds = {".npz": "npz", ".png": "png"}
        if path.suffix.lower() not in kinds:
            raise ValueError(f"{path}: dataset files must be .npz or .png (or an idx directory)")
        resolved = path.resolve()
        return _load_cached(kinds[path.suffix.lower()], str(resolved), split, _stamp(resolved))
    raise ValueError(
        f"unknown dataset {name_or_path!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}) "
        "nor an existing .npz or .png file or idx directory"
    )


# --------------------------------------------------------------------------------------------
# statistics


def class_indices(ds: Dataset) -> list[Tensor]:
    """For each class k, the (n_k,) int64 indices of its samples, in dataset order."""
    return [torch.nonzero(ds.labels == k).flatten() for k in range(ds.num_classes)]


def class_averages(ds: Dataset) -> Tensor:
    """(K, C, H, W) mean image of each class; all zeros for a class without samples."""
    k = ds.num_classes
    flat = ds.images.reshape(len(ds), -1).to(torch.float64)
    sums = torch.zeros(k, flat.shape[1], dtype=torch.float64)
    sums.index_add_(0, ds.labels, flat)
    counts = torch.bincount(ds.labels, minlength=k).to(torch.float64).clamp_min(1.0)
    means = (sums / counts[:, None]).to(torch.float32)
    return means.reshape(k, *ds.input_shape)


def channel_stats(ds: Dataset) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std over all images and pixels.

    A constant channel gets std 1.0, so that the result is always a valid normalization.
    """
    per_channel = ds.images.transpose(0, 1).reshape(ds.images.shape[1], -1).to(torch.float64)
    mean = per_channel.mean(dim=1)
    std = per_channel.std(dim=1, correction=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return [float(m) for m in mean], [float(s) for s in std]
