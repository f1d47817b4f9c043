"""Blanks a tool call's credentials (the tool's secret, the call's token) out of what the tool
answers, in the encodings a careless tool echoes them in: raw, JSON-escaped, URL-encoded, base64
(also as part of a larger encoded blob) and reversed. A last line, not a guarantee: a tool that
hashes, splits or re-encodes its secret otherwise still leaks it, so a tool must never echo it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

from services.executor.model import Redactions, ToolCall

REDACTED = b"[redacted]"
# A base64 fragment shorter than this (6 bytes of secret) matches too much unrelated text to be
# blanked on sight; the secret's whole encodings are blanked whatever their length.
MIN_FRAGMENT_CHARS = 8


@dataclass(frozen=True)
class Secret:
    """One value to keep from the agent, and what to call it in telemetry (never the value)."""

    kind: str  # "tool_secret" or "call_token"
    value: str = field(repr=False)


def of_call(call: ToolCall) -> tuple[Secret, ...]:
    """What a call carries that its answer must not give back: the tool's secret, its token."""
    return (Secret("tool_secret", call.tool.secret), Secret("call_token", call.token))


@dataclass(frozen=True)
class Redacted:
    data: bytes = field(repr=False)
    # Forms: "raw", "json", "url", "base64", "base64url", "reversed", and the text forms base64
    # was taken of ("base64(json)"); falsy when nothing was found.
    found: Redactions


def redact(data: bytes, secrets: Iterable[Secret]) -> Redacted:
    """`data` with every known form of each credential replaced by "[redacted]"."""
    forms: set[str] = set()
    kinds: set[str] = set()
    for secret in secrets:
        if not secret.value:
            continue
        for pattern, form in encodings(secret.value):
            if pattern in data:
                data = data.replace(pattern, REDACTED)
                forms.add(form)
                kinds.add(secret.kind)
    return Redacted(data, Redactions(frozenset(forms), frozenset(kinds)))


def encodings(secret: str) -> list[tuple[bytes, str]]:
    """Every byte pattern that gives `secret` away, longest first (so a whole encoding is blanked
    before a fragment of it could leave its tail behind), each with its form's name."""
    found: dict[bytes, str] = {}
    texts = list(_text_forms(secret))
    for pattern, form in texts:
        found.setdefault(pattern, form)
    for pattern, form in texts:
        for encoded, b64form in _base64_forms(pattern):
            found.setdefault(encoded, b64form if form == "raw" else f"{b64form}({form})")
    reversed_raw = secret[::-1].encode("utf-8", errors="surrogateescape")
    found.setdefault(reversed_raw, "reversed")
    return sorted(found.items(), key=lambda item: -len(item[0]))


def _text_forms(secret: str) -> Iterator[tuple[bytes, str]]:
    raw = secret.encode("utf-8", errors="surrogateescape")
    yield raw, "raw"
    # JSON string bodies as encoders write them: Python's json.dumps (\uXXXX, lowercase hex),
    # JavaScript's JSON.stringify and ensure_ascii=False (UTF-8 as is), upper-case hex (Java, .NET),
    # and `\/` (PHP).
    ascii_json = json.dumps(secret)[1:-1]
    for text in (ascii_json, json.dumps(secret, ensure_ascii=False)[1:-1], _upper_hex(ascii_json)):
        yield text.encode("utf-8", errors="surrogateescape"), "json"
        yield text.replace("/", "\\/").encode("utf-8", errors="surrogateescape"), "json"
    for text in (quote(secret, safe=""), quote(secret), quote_plus(secret), quote_plus(secret, safe="/")):
        yield text.encode("ascii"), "url"
        yield _lower_percent(text).encode("ascii"), "url"


def _base64_forms(data: bytes) -> Iterator[tuple[bytes, str]]:
    """`data` base64-encoded on its own (padded or not), and the characters that encode it inside
    any larger blob, whichever of the three byte offsets it starts at there."""
    for form, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
        whole = encode(data)
        yield whole, form
        yield whole.rstrip(b"="), form
        for skip in range(3):
            # Starting `skip` bytes in, whole 3-byte groups encode to characters that do not
            # depend on what surrounds the secret (up to two bytes at either end stay, mixed
            # into characters shared with the neighbours).
            usable = (len(data) - skip) // 3 * 3
            if usable <= 0:
                continue
            fragment = encode(data[skip:skip + usable])
            if len(fragment) >= MIN_FRAGMENT_CHARS:
                yield fragment, form


def _upper_hex(escaped: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(escaped):
        if escaped.startswith("\\\\", i):
            out.append("\\\\")
            i += 2
        elif escaped.startswith("\\u", i):
            out.append("\\u" + escaped[i + 2:i + 6].upper())
            i += 6
        else:
            out.append(escaped[i])
            i += 1
    return "".join(out)


def _lower_percent(text: str) -> str:
    parts = text.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])
