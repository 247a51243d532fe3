"""Limits on what a request may ask the workers to decode, checked from headers alone.

A PNG declares its size in its first chunk (IHDR) and an ``.npz`` array in its ``.npy`` header,
so a small file that would decompress to gigabytes (a decompression bomb) is refused here,
before anything is decoded, with 413 and the setting that governs it.
"""

from __future__ import annotations

import struct

from fastapi import HTTPException

from deepscope.settings import Settings

__all__ = ["check_image_count", "check_image_pixels", "png_size"]

_PNG = b"\x89PNG\r\n\x1a\n"


def png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (the first 24 bytes), None if it has none."""
    if len(head) < 24 or not head.startswith(_PNG) or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def check_image_pixels(settings: Settings, width: int, height: int, label: str) -> None:
    """413 when one image has more pixels than ``max_image_pixels``."""
    if width * height > settings.max_image_pixels:
        raise HTTPException(
            413,
            f"{label} is {width}×{height} pixels, over the limit of {settings.max_image_pixels} "
            "pixels per image (DEEPSCOPE_MAX_IMAGE_PIXELS)",
        )


def check_image_count(settings: Settings, count: int) -> None:
    """413 when one request carries more images than ``max_predict_images``."""
    if count > settings.max_predict_images:
        raise HTTPException(
            413,
            f"{count} images in one request, over the limit of {settings.max_predict_images} "
            "(DEEPSCOPE_MAX_PREDICT_IMAGES); split them",
        )
