"""Signed, expiring, read-only links for browsers (the report and index pages).

A browser cannot send ``Authorization: Bearer KEY`` with an ``<img>``, and an API key in a URL
(``?key=``) would grant everything, for ever, to whoever reads a log, a history or a
``Referer``. So the pages and their pictures are reached through links that carry
``t`` (tenant), ``exp`` (unix seconds) and ``sig``, an HMAC-SHA256 over tenant, scope and expiry.

* The HMAC secret of a tenant is derived from that tenant's API keys (HMAC of the sorted keys):
  nothing else to configure or share between API replicas, only a holder of the tenant's key
  can mint its links, and rotating the key revokes every link made with the old one.
* A link is read-only and scoped: :data:`SCOPE_UI` (the tenant's index, reports and artifacts)
  or :func:`job_scope` (one job's report and artifacts). It never works on the JSON API.
* Links expire (at most :data:`MAX_TTL_S`); the pages pass their own expiry on to the links they
  contain, so following links never extends access.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import urlencode

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_TTL_S",
    "SCOPE_UI",
    "LinkError",
    "LinkSigner",
    "SignedLink",
    "job_scope",
]

SCOPE_UI = "ui"
DEFAULT_TTL_S = 3600
MAX_TTL_S = 24 * 3600
_CONTEXT = b"deepscope-links-v1"
_SIG_BYTES = 20


def job_scope(job_id: str) -> str:
    return f"job:{job_id}"


class LinkError(ValueError):
    """A link that is malformed, forged, expired or outside its scope (HTTP 401)."""


@dataclass(frozen=True)
class SignedLink:
    tenant: str
    scope: str
    expires: int
    sig: str

    def query(self) -> str:
        """``t=...&exp=...&sig=...`` (URL-encoded)."""
        return urlencode({"t": self.tenant, "exp": self.expires, "sig": self.sig})


class LinkSigner:
    """Mints and checks links for the tenants of one key table (``{key: tenant}``)."""

    def __init__(self, keys: dict[str, str]) -> None:
        by_tenant: dict[str, list[str]] = {}
        for key, tenant in keys.items():
            by_tenant.setdefault(tenant, []).append(key)
        self._secrets = {
            tenant: hmac.new(_CONTEXT, "\n".join(sorted(ks)).encode(), hashlib.sha256).digest()
            for tenant, ks in by_tenant.items()
        }

    def _sig(self, tenant: str, scope: str, expires: int) -> str:
        message = f"{tenant}\n{scope}\n{expires}".encode()
        digest = hmac.new(self._secrets[tenant], message, hashlib.sha256).digest()[:_SIG_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, tenant: str, scope: str, expires: int) -> SignedLink:
        """A link for ``tenant`` and ``scope`` valid until ``expires`` (unix seconds)."""
        if tenant not in self._secrets:
            raise LinkError(f"no API key for tenant {tenant!r}")
        return SignedLink(tenant, scope, int(expires), self._sig(tenant, scope, int(expires)))

    def sign_for(self, tenant: str, scope: str, ttl_s: int = DEFAULT_TTL_S) -> SignedLink:
        """A link valid for ``ttl_s`` seconds from now (at most :data:`MAX_TTL_S`)."""
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"a link lives between 1 and {MAX_TTL_S} seconds, got {ttl_s}")
        return self.sign(tenant, scope, int(time.time()) + ttl_s)

    def verify(
        self,
        tenant: str | None,
        expires: str | None,
        sig: str | None,
        scopes: tuple[str, ...],
        *,
        now: float | None = None,
    ) -> SignedLink:
        """The link if it is genuine, unexpired and made for one of ``scopes``; LinkError else."""
        if not tenant or not expires or not sig:
            raise LinkError("incomplete link: it needs t, exp and sig")
        try:
            exp = int(expires)
        except ValueError:
            raise LinkError("malformed link expiry") from None
        if tenant not in self._secrets:
            raise LinkError("invalid link")
        matched = None
        # Every scope is compared (no early exit), each in constant time.
        for scope in scopes:
            if hmac.compare_digest(self._sig(tenant, scope, exp), sig):
                matched = scope
        if matched is None:
            raise LinkError("invalid link (forged, altered, or for another page)")
        if exp < (time.time() if now is None else now):
            raise LinkError("the link expired; ask for a new one (deepscope report JOB)")
        return SignedLink(tenant, matched, exp, sig)
