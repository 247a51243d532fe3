"""Checks of uploaded ``.npz`` datasets with numpy alone (the API never imports torch).

The rules follow :func:`deepscope.models.datasets.load_dataset`, which the worker applies again:
``images`` (N, H, W) or (N, C, H, W), uint8 or float in [0, 1]; ``labels`` (N,) non-negative
integers; optional ``class_names``. Array headers are read first, so a small compressed file
that would decompress to gigabytes is refused before anything is loaded; pickled (object)
arrays are refused.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NpzInfo", "inspect_npz", "npz_images_shape"]

#: Arrays in one .npz (a dataset needs 2 or 3; many tiny entries would only cost memory).
_MAX_MEMBERS = 64


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


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]]:
    """{array name: (shape, dtype)} from the .npy headers inside the archive."""
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
    out: dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]] = {}
    with archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                except ValueError as exc:
                    raise ValueError(f"{member}: not a .npy array: {exc}") from None
            out[member[: -len(".npy")]] = (tuple(int(d) for d in shape), dtype)
    return out


def _check_size(
    headers: dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]], max_bytes: int
) -> None:
    for name, (shape, dtype) in headers.items():
        if dtype.hasobject:
            raise ValueError(f"{name!r} is an object (pickled) array; only numeric arrays")
        size = math.prod(shape) * dtype.itemsize
        if size > max_bytes:
            raise ValueError(
                f"{name!r} would take {size} bytes in memory, over the limit of {max_bytes}"
            )


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
    shape, dtype = headers[key]
    if dtype != np.uint8 and dtype.kind != "f":
        raise ValueError(f"{key!r} must be uint8 (0..255) or float in [0, 1], got {dtype}")
    return _image_shape(shape, repr(key))


def inspect_npz(path: Path, *, max_bytes: int) -> NpzInfo:
    """Validate a dataset archive and describe it; ValueError with a one-line reason."""
    headers = _headers(path)
    for key in ("images", "labels"):
        if key not in headers:
            have = ", ".join(sorted(headers)) or "none"
            raise ValueError(f"the .npz has no {key!r} array (has: {have})")
    _check_size(headers, max_bytes)
    with np.load(path, allow_pickle=False) as data:
        images = np.asarray(data["images"])
        labels = np.asarray(data["labels"])
        names_arr = np.asarray(data["class_names"]) if "class_names" in headers else None
    n, chw = _image_shape(images.shape, "'images'")
    if images.dtype != np.uint8:
        if images.dtype.kind != "f":
            raise ValueError(f"'images' must be uint8 or float in [0, 1], got {images.dtype}")
        if not np.isfinite(images).all():
            raise ValueError("'images' contain NaN or infinity")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float 'images' must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"'labels' must be 1-d integers (N,), got {labels.dtype} of shape {list(labels.shape)}"
        )
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative, got {int(labels.min())}")
    num_classes = int(labels.max()) + 1
    class_names: list[str] | None = None
    if names_arr is not None:
        if names_arr.ndim != 1 or names_arr.dtype.kind not in "US":
            raise ValueError("'class_names' must be a 1-d string array")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names_arr.tolist()]
        if len(class_names) < num_classes:
            raise ValueError(
                f"{len(class_names)} class_names but labels go up to {num_classes - 1}"
            )
        num_classes = len(class_names)
    return NpzInfo(n, chw, num_classes, class_names)
