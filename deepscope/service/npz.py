"""Checks of uploaded ``.npz`` datasets with numpy alone (the API never imports torch).

The rules follow :func:`deepscope.models.datasets.load_dataset`, which the worker applies again:
``images`` (N, H, W) or (N, C, H, W), uint8 or float in [0, 1]; ``labels`` (N,) non-negative
integers; optional ``class_names`` (valid text). Shapes, types and sizes come from the ``.npy``
headers, so a small compressed file that would decompress to gigabytes (over the size limit, or
compressed more than 200:1) is refused without decompressing it; pickled (object) arrays are
refused. The API never holds an array: the values it checks (float images' range, the labels)
are streamed a megabyte at a time, and ``class_names`` is read only when it is small.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from numpy.typing import NDArray

from deepscope.contract.text import check_text

__all__ = ["NpzInfo", "inspect_npz", "npz_images_shape"]

#: Arrays in one .npz (a dataset needs 2 or 3; many tiny entries would only cost memory).
_MAX_MEMBERS = 64
#: An array that decompresses to more than this many times its compressed size is refused
#: (zeros compress about 1000:1; real images, even mostly blank ones, far less) ...
_MAX_RATIO = 200
#: ... once it is this large (a small array may compress any amount).
_RATIO_FROM_BYTES = 16 * 1024 * 1024
#: What is read of an array at a time when its values are checked.
_CHUNK_BYTES = 1024 * 1024
#: ``class_names`` is read whole, so it must be small.
_MAX_NAMES_BYTES = 1024 * 1024


@dataclass(frozen=True)
class NpzInfo:
    num_samples: int
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str] | None


def _member_count(path: Path) -> int | None:
    """Entries in the zip's central directory, read from its end record (zip64 too) before
    :class:`zipfile.ZipFile` builds an object per entry; None when there is no end record."""
    size = path.stat().st_size
    with path.open("rb") as f:
        tail_len = min(size, 22 + 65535)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        total = int.from_bytes(tail[at + 10 : at + 12], "little")
        locator = tail.rfind(b"PK\x06\x07", 0, at)
        if total == 0xFFFF and locator >= 0 and at - locator >= 20:
            f.seek(int.from_bytes(tail[locator + 8 : locator + 16], "little"))
            record = f.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                total = int.from_bytes(record[32:40], "little")
    return total


@dataclass(frozen=True)
class _Array:
    """An array of the archive, as its ``.npy`` header and its zip entry describe it."""

    member: str
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]
    compressed: int  # bytes of the zip entry

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[np.generic]]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(d) for d in shape), dtype


def _headers(path: Path) -> dict[str, _Array]:
    """{array name: what its header says}, from the .npy headers inside the archive (nothing
    else of an array is read)."""
    try:
        members = _member_count(path)
    except OSError:
        members = None
    if members is not None and members > _MAX_MEMBERS:
        raise ValueError(f"the .npz holds {members} files; an .npz may hold at most {_MAX_MEMBERS}")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ValueError("not an .npz file (it is not a zip archive)") from None
    out: dict[str, _Array] = {}
    with archive:
        for info in archive.infolist():
            member = info.filename
            if not member.endswith(".npy"):
                continue
            try:
                with archive.open(info) as f:
                    shape, dtype = _read_header(f)
            except ValueError as exc:
                raise ValueError(f"{member}: not a .npy array: {exc}") from None
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                raise ValueError(f"{member}: cannot be read from the archive ({exc})") from None
            out[member[: -len(".npy")]] = _Array(member, shape, dtype, info.compress_size)
    return out


def _check_size(headers: dict[str, _Array], max_bytes: int) -> None:
    """Refuse pickled arrays, arrays over ``max_bytes``, and arrays that decompress to far more
    than they take in the archive (a decompression bomb), from their headers alone."""
    for name, array in headers.items():
        if array.dtype.hasobject:
            raise ValueError(f"{name!r} is an object (pickled) array; only numeric arrays")
        size = array.nbytes
        if size > max_bytes:
            raise ValueError(
                f"{name!r} would take {size} bytes in memory, over the limit of {max_bytes}"
            )
        if size >= _RATIO_FROM_BYTES and size > _MAX_RATIO * max(1, array.compressed):
            raise ValueError(
                f"{name!r} would decompress from {array.compressed} to {size} bytes, more than "
                f"{_MAX_RATIO}:1 (a decompression bomb?)"
            )


def _chunks(path: Path, array: _Array) -> Iterator[NDArray[np.generic]]:
    """The array's values a bounded chunk at a time (never the whole array in memory)."""
    count = math.prod(array.shape)
    itemsize = max(1, array.dtype.itemsize)
    per_chunk = max(1, _CHUNK_BYTES // itemsize)
    with zipfile.ZipFile(path) as archive, archive.open(array.member) as f:
        _read_header(f)
        left = count
        while left > 0:
            n = min(per_chunk, left)
            raw = f.read(n * itemsize)
            if len(raw) < n * itemsize:
                raise ValueError(f"{array.member} is truncated")
            yield np.frombuffer(raw, dtype=array.dtype)
            left -= n


def _value_range(path: Path, array: _Array, what: str) -> tuple[float, float]:
    """(min, max) of an array, streamed; ValueError on NaN or infinity."""
    lo, hi = math.inf, -math.inf
    try:
        for chunk in _chunks(path, array):
            if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
                raise ValueError(f"{what} contain NaN or infinity")
            if chunk.size:
                lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{what} cannot be read from the archive ({exc})") from None
    return lo, hi


def _class_names(path: Path, array: _Array) -> list[str]:
    """The class names, read whole: a small array (at most _MAX_NAMES_BYTES)."""
    if len(array.shape) != 1 or array.dtype.kind not in "US":
        raise ValueError("'class_names' must be a 1-d string array")
    if array.nbytes > _MAX_NAMES_BYTES:
        raise ValueError(
            f"'class_names' would take {array.nbytes} bytes; at most {_MAX_NAMES_BYTES}"
        )
    with zipfile.ZipFile(path) as archive, archive.open(array.member) as f:
        values = np.lib.format.read_array(f, allow_pickle=False).tolist()
    names = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise ValueError(f"class_names[{i}] is not UTF-8 text") from None
        names.append(str(value))
    check_text(names, "class_names")
    return names


def _image_shape(shape: tuple[int, ...], where: str) -> tuple[int, tuple[int, int, int]]:
    if len(shape) == 3:
        n, h, w = shape
        chw = (1, h, w)
    elif len(shape) == 4:
        n, c, h, w = shape
        chw = (c, h, w)
    else:
        raise ValueError(f"{where} must be (N, H, W) or (N, C, H, W), got shape {list(shape)}")
    if n == 0 or min(chw) == 0:
        raise ValueError(f"{where} is empty (shape {list(shape)})")
    return n, chw


def npz_images_shape(path: Path, key: str, max_bytes: int) -> tuple[int, tuple[int, int, int]]:
    """(N, (C, H, W)) of the array ``key`` from its header; ValueError on anything else."""
    headers = _headers(path)
    if key not in headers:
        raise ValueError(f"the .npz has no {key!r} array (has: {', '.join(sorted(headers))})")
    _check_size({key: headers[key]}, max_bytes)
    array = headers[key]
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise ValueError(f"{key!r} must be uint8 (0..255) or float in [0, 1], got {array.dtype}")
    return _image_shape(array.shape, repr(key))


def inspect_npz(path: Path, *, max_bytes: int) -> NpzInfo:
    """Validate a dataset archive and describe it; ValueError with a one-line reason.

    Shapes, types and sizes come from the headers. The values the checks need (the range of
    float images, the labels) are streamed a chunk at a time; uint8 images are never read.
    """
    headers = _headers(path)
    for key in ("images", "labels"):
        if key not in headers:
            have = ", ".join(sorted(headers)) or "none"
            raise ValueError(f"the .npz has no {key!r} array (has: {have})")
    _check_size(headers, max_bytes)
    images, labels = headers["images"], headers["labels"]
    n, chw = _image_shape(images.shape, "'images'")
    if images.dtype != np.uint8:
        if images.dtype.kind != "f":
            raise ValueError(f"'images' must be uint8 or float in [0, 1], got {images.dtype}")
        lo, hi = _value_range(path, images, "'images'")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float 'images' must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    if len(labels.shape) != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"'labels' must be 1-d integers (N,), got {labels.dtype} of shape {list(labels.shape)}"
        )
    if labels.shape[0] != n:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    low, high = _value_range(path, labels, "'labels'")
    if low < 0:
        raise ValueError(f"labels must be non-negative, got {int(low)}")
    num_classes = int(high) + 1
    class_names: list[str] | None = None
    if "class_names" in headers:
        class_names = _class_names(path, headers["class_names"])
        if len(class_names) < num_classes:
            raise ValueError(
                f"{len(class_names)} class_names but labels go up to {num_classes - 1}"
            )
        num_classes = len(class_names)
    return NpzInfo(n, chw, num_classes, class_names)
