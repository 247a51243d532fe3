"""Webhook signatures (``contract.signing``) with known answers, and which callback URLs a
deployment accepts (``store.webhooks.check_callback_url``)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from deepscope.contract.signing import sign, verify_signature
from deepscope.store.webhooks import CallbackNotAllowedError, check_callback_url

BODY = b'{"id":"abc","status":"succeeded"}'


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(b"k3y", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, "k3y", 1700000000) == f"t=1700000000,v1={expected}"


def test_verify_signature() -> None:
    header = sign(BODY, "k3y", 1700000000)
    assert verify_signature(BODY, header, "k3y", now=1700000100)
    assert verify_signature(BODY, header, "k3y", now=1699999800)  # a clock a little behind
    assert not verify_signature(BODY, header, "k3y", now=1700000301)  # too old: a replay
    assert not verify_signature(BODY, header, "other", now=1700000000)
    assert not verify_signature(BODY + b"\n", header, "k3y", now=1700000000)
    # The timestamp is signed: moving it breaks the signature.
    moved = header.replace("t=1700000000", "t=1700000100")
    assert not verify_signature(BODY, moved, "k3y", now=1700000100)
    # A rotated key: any v1 entry may match; unknown entries are ignored.
    other = sign(BODY, "old", 1700000000).split(",")[1]
    assert verify_signature(BODY, f"{header},{other},v0=zz", "old", now=1700000000)
    for bad in ("", "t=x,v1=00", "v1=00", "t=1700000000", "garbage", "t=1700000000,v1="):
        assert not verify_signature(BODY, bad, "k3y", now=1700000000), bad


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "https://ci.example.com/deepscope?x=1",
        "HTTPS://CI.EXAMPLE.COM/path",
        "https://hooks.example.org:8443/a",
        "http://[::1]:9000/a",
    ],
)
def test_allowed_callbacks(url: str) -> None:
    hosts = "127.0.0.1, ci.example.com,hooks.example.org:8443,[::1]:9000"
    assert check_callback_url(url, hosts) == url


@pytest.mark.parametrize(
    ("url", "hosts", "why"),
    [
        ("ftp://127.0.0.1/a", "127.0.0.1", "http or https"),
        ("file:///etc/passwd", "127.0.0.1", "http or https"),
        ("javascript:alert(1)", "127.0.0.1", "http or https"),
        ("127.0.0.1:8080/a", "127.0.0.1", "http or https"),
        ("http:///nohost", "127.0.0.1", "no host"),
        ("http://127.0.0.1/a", "", "accepts no callback"),
        ("http://evil.example/a", "127.0.0.1", "not allowed"),
        ("http://127.0.0.1.evil.example/a", "127.0.0.1", "not allowed"),
        ("https://hooks.example.org/a", "hooks.example.org:8443", "not allowed"),  # port 443
        ("http://hooks.example.org:8443/a", "hooks.example.org:443", "not allowed"),
        ("http://u:p@127.0.0.1/a", "127.0.0.1", "credentials"),
        ("http://127.0.0.1:99999/a", "127.0.0.1", "not a valid URL"),
        ("http://127.0.0.1/" + "a" * 2100, "127.0.0.1", "longer than"),
    ],
)
def test_refused_callbacks(url: str, hosts: str, why: str) -> None:
    with pytest.raises(CallbackNotAllowedError, match=why):
        check_callback_url(url, hosts)
