"""Signed read-only links: what they open, and everything that must not open."""

from __future__ import annotations

import time

import pytest

from deepscope.service.links import MAX_TTL_S, SCOPE_UI, LinkError, LinkSigner, job_scope

KEYS = {"key-a-1": "alice", "key-a-2": "alice", "key-b": "bob"}
JOB = "a" * 32
OTHER = "b" * 32


def _verify(signer: LinkSigner, q: dict[str, str], scopes: tuple[str, ...]) -> str:
    return signer.verify(q["t"], q["exp"], q["sig"], scopes).scope


def _query(signer: LinkSigner, tenant: str, scope: str, expires: int) -> dict[str, str]:
    link = signer.sign(tenant, scope, expires)
    return {"t": link.tenant, "exp": str(link.expires), "sig": link.sig}


def test_a_link_opens_its_scope_until_it_expires() -> None:
    signer = LinkSigner(KEYS)
    future = int(time.time()) + 600
    q = _query(signer, "alice", job_scope(JOB), future)
    assert _verify(signer, q, (SCOPE_UI, job_scope(JOB))) == job_scope(JOB)
    ui = _query(signer, "alice", SCOPE_UI, future)
    assert _verify(signer, ui, (SCOPE_UI, job_scope(OTHER))) == SCOPE_UI
    # Another signer over the same keys (another API replica) agrees.
    assert _verify(LinkSigner(dict(reversed(KEYS.items()))), q, (job_scope(JOB),))
    with pytest.raises(LinkError, match="expired"):
        signer.verify("alice", q["exp"], q["sig"], (job_scope(JOB),), now=future + 1)


@pytest.mark.parametrize(
    "change",
    [
        {"t": "bob"},  # the tenant swapped
        {"exp": "9999999999"},  # the expiry extended
        {"sig": "A" * 27},  # forged
        {"t": "mallory"},  # no such tenant
        {"exp": "soon"},
        {"sig": ""},
    ],
)
def test_altered_links_do_not_open(change: dict[str, str]) -> None:
    signer = LinkSigner(KEYS)
    q = _query(signer, "alice", job_scope(JOB), int(time.time()) + 600) | change
    with pytest.raises(LinkError):
        _verify(signer, q, (job_scope(JOB),))


def test_a_job_link_opens_neither_another_job_nor_the_index() -> None:
    signer = LinkSigner(KEYS)
    q = _query(signer, "alice", job_scope(JOB), int(time.time()) + 600)
    with pytest.raises(LinkError, match="another page"):
        _verify(signer, q, (SCOPE_UI, job_scope(OTHER)))
    with pytest.raises(LinkError):
        _verify(signer, q, (SCOPE_UI,))


def test_rotating_a_tenants_key_revokes_its_links_only() -> None:
    signer = LinkSigner(KEYS)
    exp = int(time.time()) + 600
    a = _query(signer, "alice", SCOPE_UI, exp)
    b = _query(signer, "bob", SCOPE_UI, exp)
    rotated = LinkSigner({"key-a-1": "alice", "key-a-3": "alice", "key-b": "bob"})
    with pytest.raises(LinkError):
        _verify(rotated, a, (SCOPE_UI,))
    assert _verify(rotated, b, (SCOPE_UI,)) == SCOPE_UI
    # Bob's key alone cannot mint Alice's links: the secrets differ per tenant.
    assert a["sig"] != _query(LinkSigner({"key-b": "alice"}), "alice", SCOPE_UI, exp)["sig"]


def test_link_lifetimes_are_bounded() -> None:
    signer = LinkSigner(KEYS)
    link = signer.sign_for("bob", SCOPE_UI, MAX_TTL_S)
    assert link.expires <= time.time() + MAX_TTL_S + 1
    for ttl in (0, MAX_TTL_S + 1):
        with pytest.raises(ValueError, match="between"):
            signer.sign_for("bob", SCOPE_UI, ttl)
    with pytest.raises(LinkError, match="no API key"):
        signer.sign_for("mallory", SCOPE_UI)
