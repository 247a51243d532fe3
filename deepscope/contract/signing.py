"""The signature of webhook deliveries, for the service that signs and the receivers that check:
``Deepscope-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(key, f"{t}.{body}")>``, keyed with
the tenant's API key. The timestamp is signed too, so a captured delivery cannot be replayed
later than ``tolerance_s``. Standard library only."""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_HEADER", "sign", "verify_signature"]

#: The header that carries the signature.
SIGNATURE_HEADER = "Deepscope-Signature"


def _digest(body: bytes, key: str, t: int) -> str:
    return hmac.new(key.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(body: bytes, key: str, t: int | None = None) -> str:
    """The ``Deepscope-Signature`` value of ``body`` signed with ``key`` at unix time ``t``
    (now by default)."""
    stamp = int(time.time()) if t is None else int(t)
    return f"t={stamp},v1={_digest(body, key, stamp)}"


def verify_signature(
    body: bytes, header: str, key: str, tolerance_s: float = 300, *, now: float | None = None
) -> bool:
    """Whether ``header`` (a ``Deepscope-Signature`` value) signs exactly ``body`` (the raw
    request body, before any JSON parsing) with ``key``, at a time within ``tolerance_s`` of
    ``now``. Several ``v1=`` entries are accepted (any one matching), so that a key can be
    rotated; unknown entries are ignored. False for anything malformed."""
    stamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            try:
                stamp = int(value)
            except ValueError:
                return False
        elif name == "v1":
            candidates.append(value)
    if stamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - stamp) > tolerance_s:
        return False
    expected = _digest(body, key, stamp)
    # Every candidate compared in constant time (no early exit).
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    return matched
