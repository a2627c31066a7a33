"""Webhook signatures (scheme `v1`): HMAC-SHA256, Stripe-like, with the delivery id inside the signed bytes.

A sender signs each delivery attempt with the shared secret and the current Unix time:

    signed  = f"{timestamp}.{delivery_id}.".encode() + raw_body
    X-Flywheel-Signature: t=<timestamp>,v1=<hex HMAC-SHA256(secret, signed)>
    X-Flywheel-Delivery:  <delivery_id>

The delivery id is signed too: were it not, a request captured in flight could be replayed within the
timestamp tolerance under a fresh delivery id, and deduplication by delivery id would not catch it.
Several `v1=` entries may be sent (a sender moving to a new secret signs with both); the receiver
accepts a delivery when any entry matches any of its active secrets (current and, during a rotation,
previous). Standard library only: the CLI's `webhook sign` and the receiver share it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flywheel.errors import FlywheelError

SIGNATURE_HEADER = "X-Flywheel-Signature"
DELIVERY_HEADER = "X-Flywheel-Delivery"
SCHEME = "v1"
MIN_SECRET_CHARS = 16
MAX_SIGNATURES = 4  # v1 entries per header: enough for a rotation, too few to turn verification into work
DELIVERY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")


class SignatureError(FlywheelError):
    """The request is not signed by an active secret (or not signed at all). Safe to show the sender."""


@dataclass(frozen=True)
class Secret:
    label: str  # "current" | "previous": recorded with the delivery, so a rotation's progress is visible
    value: str


@dataclass(frozen=True)
class Verified:
    delivery_id: str
    timestamp: int
    secret: str  # the label of the secret that matched


def signed_bytes(timestamp: int, delivery_id: str, body: bytes) -> bytes:
    return f"{timestamp}.{delivery_id}.".encode() + body


def sign(secret: str, timestamp: int, delivery_id: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of one delivery attempt."""
    return hmac.new(secret.encode(), signed_bytes(timestamp, delivery_id, body), hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], timestamp: int, delivery_id: str, body: bytes) -> str:
    """The `X-Flywheel-Signature` value: one `v1=` entry per secret."""
    return ",".join([f"t={timestamp}", *(f"{SCHEME}={sign(s, timestamp, delivery_id, body)}" for s in secrets)])


def check_delivery_id(value: str | None) -> str:
    if not value:
        raise SignatureError(f"missing {DELIVERY_HEADER} header (a unique id per delivery, kept across retries)")
    if not DELIVERY_ID.fullmatch(value):
        raise SignatureError(f"{DELIVERY_HEADER}: must be 1-128 characters of A-Z a-z 0-9 . _ : - "
                             "starting with a letter or digit")
    return value


def parse_signature(value: str | None) -> tuple[int, list[str]]:
    """(timestamp, v1 signatures) of a header value; SignatureError naming what is malformed."""
    if not value:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header (t=<unix time>,{SCHEME}=<hex HMAC-SHA256>)")
    if len(value) > 1024:
        raise SignatureError(f"{SIGNATURE_HEADER}: too long")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in value.split(","):
        key, sep, item = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"{SIGNATURE_HEADER}: expected key=value pairs, got {part.strip()[:40]!r}")
        if key == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(item):
                raise SignatureError(f"{SIGNATURE_HEADER}: t must appear once, as Unix seconds")
            timestamp = int(item)
        elif key == SCHEME:
            if not _HEX64.fullmatch(item.lower()):
                raise SignatureError(f"{SIGNATURE_HEADER}: {SCHEME} must be 64 hex characters")
            signatures.append(item.lower())
        # other keys (a future scheme) are ignored, as Stripe's receivers do
    if timestamp is None:
        raise SignatureError(f"{SIGNATURE_HEADER}: no t=<unix time>")
    if not signatures:
        raise SignatureError(f"{SIGNATURE_HEADER}: no {SCHEME}=<signature>")
    if len(signatures) > MAX_SIGNATURES:
        raise SignatureError(f"{SIGNATURE_HEADER}: more than {MAX_SIGNATURES} {SCHEME} entries")
    return timestamp, signatures


def verify(signature: str | None, delivery: str | None, body: bytes, secrets: Sequence[Secret], now: float,
           tolerance_s: float) -> Verified:
    """Check one request; SignatureError says why it is refused (never what the right signature would be)."""
    if not secrets:
        raise ValueError("no active secret: refuse to verify anything")
    delivery_id = check_delivery_id(delivery)
    timestamp, given = parse_signature(signature)
    # before the HMAC: cheap, and it tells nobody anything the clock does not
    skew = timestamp - now
    if abs(skew) > tolerance_s:
        side = "in the future" if skew > 0 else "old"
        raise SignatureError(f"{SIGNATURE_HEADER}: timestamp is {abs(skew):.0f} s {side} (tolerance "
                             f"{tolerance_s:.0f} s): sign each attempt with the current time")
    matched = None
    for secret in secrets:
        expected = sign(secret.value, timestamp, delivery_id, body)
        for candidate in given:
            # every pair is compared, in constant time each: how long this takes does not depend on
            # how much of a signature was right
            if hmac.compare_digest(expected, candidate) and matched is None:
                matched = secret.label
    if matched is None:
        raise SignatureError(f"{SIGNATURE_HEADER}: signature does not match the body and delivery id with any "
                             "active secret")
    return Verified(delivery_id=delivery_id, timestamp=timestamp, secret=matched)


def load_secrets(current_env: str, previous_env: str, environ: Mapping[str, str]) -> list[Secret]:
    """The active secrets from the environment; FlywheelError naming the variable when unusable."""
    current = environ.get(current_env) or ""
    if not current:
        raise FlywheelError(f"the webhook receiver needs a shared secret: set the environment variable "
                            f"{current_env} (at least {MIN_SECRET_CHARS} characters)")
    out = [Secret("current", current)]
    previous = environ.get(previous_env) or ""
    if previous:
        out.append(Secret("previous", previous))
    for secret, name in zip(out, (current_env, previous_env), strict=False):
        if len(secret.value) < MIN_SECRET_CHARS:
            raise FlywheelError(f"{name} is {len(secret.value)} characters; use at least {MIN_SECRET_CHARS} "
                                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return out
