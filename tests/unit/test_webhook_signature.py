"""flywheel/hmacsig.py: the `v1` webhook signature, each way a request can fail it, and the secrets it loads."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from flywheel.errors import FlywheelError
from flywheel.hmacsig import (
    MIN_SECRET_CHARS,
    Secret,
    SignatureError,
    load_secrets,
    sign,
    signature_header,
    verify,
)

CURRENT = Secret("current", "current-secret-0123456789")
PREVIOUS = Secret("previous", "previous-secret-0123456789")
NOW = 1_800_000_000
BODY = b'{"reason": "labels reviewed"}'
DELIVERY = "d-42"


def _check(header: str | None, delivery: str | None = DELIVERY, body: bytes = BODY, now: float = NOW,
           secrets: list[Secret] | None = None):
    return verify(header, delivery, body, secrets or [CURRENT], now, tolerance_s=300)


def _header(secret: Secret = CURRENT, ts: int = NOW, delivery: str = DELIVERY, body: bytes = BODY) -> str:
    return signature_header([secret.value], ts, delivery, body)


def test_the_scheme_is_hmac_sha256_over_timestamp_delivery_and_raw_body() -> None:
    # what a sender in any language computes: hex HMAC-SHA256(secret, "<t>.<delivery>.<raw body>")
    expected = hmac.new(CURRENT.value.encode(), f"{NOW}.{DELIVERY}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(CURRENT.value, NOW, DELIVERY, BODY) == expected
    assert _header() == f"t={NOW},v1={expected}"
    ok = _check(_header())
    assert (ok.delivery_id, ok.timestamp, ok.secret) == (DELIVERY, NOW, "current")


def test_either_active_secret_verifies_and_says_which() -> None:
    both = [CURRENT, PREVIOUS]
    assert _check(_header(PREVIOUS), secrets=both).secret == "previous"
    assert _check(_header(CURRENT), secrets=both).secret == "current"
    # a sender rotating sends one v1 per secret; uppercase hex is the same signature
    two = signature_header([PREVIOUS.value, "some-newer-secret-not-known-yet"], NOW, DELIVERY, BODY)
    assert _check(two.upper().replace("T=", "t=").replace("V1=", "v1="), secrets=both).secret == "previous"
    with pytest.raises(SignatureError, match="does not match"):
        _check(_header(PREVIOUS))  # the previous secret only counts while it is configured


@pytest.mark.parametrize(("header", "delivery", "body", "now", "reason"), [
    (None, DELIVERY, BODY, NOW, "missing X-Flywheel-Signature"),
    ("", DELIVERY, BODY, NOW, "missing X-Flywheel-Signature"),
    (_header(), None, BODY, NOW, "missing X-Flywheel-Delivery"),
    (_header(), "", BODY, NOW, "missing X-Flywheel-Delivery"),
    (_header(), "has space", BODY, NOW, "X-Flywheel-Delivery: must be"),
    (_header(), "x" * 129, BODY, NOW, "X-Flywheel-Delivery: must be"),
    (_header(), "-leading-dash", BODY, NOW, "X-Flywheel-Delivery: must be"),
    (_header(), "d-42\n", BODY, NOW, "X-Flywheel-Delivery: must be"),
    (_header(), DELIVERY, BODY + b" ", NOW, "does not match"),  # tampered body (one byte)
    (_header(), DELIVERY, b'{"reason": "labels reviewEd"}', NOW, "does not match"),
    (_header(), "d-43", BODY, NOW, "does not match"),  # replayed under a fresh delivery id
    (_header(Secret("current", "not-the-secret-at-all!!")), DELIVERY, BODY, NOW, "does not match"),
    (_header(ts=NOW - 301), DELIVERY, BODY, NOW, "301 s old"),
    (_header(ts=NOW + 301), DELIVERY, BODY, NOW, "301 s in the future"),
    (_header().replace(f"t={NOW}", f"t={NOW - 1}"), DELIVERY, BODY, NOW, "does not match"),  # re-dated
    ("v1=" + "a" * 64, DELIVERY, BODY, NOW, "no t="),
    (f"t={NOW}", DELIVERY, BODY, NOW, "no v1="),
    (f"t={NOW},v1=xyz", DELIVERY, BODY, NOW, "64 hex"),
    (f"t=soon,v1={'a' * 64}", DELIVERY, BODY, NOW, "Unix seconds"),
    (f"t={NOW},t={NOW},v1={'a' * 64}", DELIVERY, BODY, NOW, "t must appear once"),
    (f"t={NOW},v1", DELIVERY, BODY, NOW, "key=value"),
    (f"t={NOW}," + ",".join(["v1=" + "a" * 64] * 5), DELIVERY, BODY, NOW, "more than 4"),
    (f"t={NOW},v1={'a' * 64}," + "x" * 2000, DELIVERY, BODY, NOW, "too long"),
])
def test_refused_with_the_reason(header: str | None, delivery: str | None, body: bytes, now: float,
                                 reason: str) -> None:
    with pytest.raises(SignatureError, match=reason) as err:
        _check(header, delivery, body, now)
    assert sign(CURRENT.value, NOW, DELIVERY, BODY) not in str(err.value)  # never tells the right answer


def test_tolerance_is_inclusive_both_ways_and_other_schemes_are_ignored() -> None:
    assert _check(_header(ts=NOW - 300)).timestamp == NOW - 300
    assert _check(_header(ts=NOW + 300)).timestamp == NOW + 300
    assert _check(_header() + ",v0=legacy").secret == "current"


def test_verify_refuses_to_run_without_a_secret() -> None:
    with pytest.raises(ValueError, match="no active secret"):
        verify(_header(), DELIVERY, BODY, [], NOW, 300)


def test_secrets_come_from_the_named_variables_and_errors_name_them() -> None:
    ok = "y" * MIN_SECRET_CHARS
    assert load_secrets("HOOK", "HOOK_OLD", {"HOOK": ok}) == [Secret("current", ok)]
    assert [s.label for s in load_secrets("HOOK", "HOOK_OLD", {"HOOK": ok, "HOOK_OLD": ok + "z"})] == [
        "current", "previous"]
    with pytest.raises(FlywheelError, match="set the environment variable HOOK "):
        load_secrets("HOOK", "HOOK_OLD", {"HOOK_OLD": ok})  # the previous one alone is no secret
    with pytest.raises(FlywheelError, match="HOOK is 5 characters"):
        load_secrets("HOOK", "HOOK_OLD", {"HOOK": "short"})
    with pytest.raises(FlywheelError, match="HOOK_OLD is 3 characters"):
        load_secrets("HOOK", "HOOK_OLD", {"HOOK": ok, "HOOK_OLD": "old"})
