"""Keyset page tokens (AIP-158) for every List method.

A token is opaque to callers and continues only the query it came from: it carries the position
after the last row returned (the row's key in the listing order) and a fingerprint of the method,
the caller it was issued to and the filter. A token from another query, another tenant or a
hand-edited one is INVALID_ARGUMENT naming page_token. Keyset positions, unlike offsets, neither
skip nor repeat rows when rows are inserted or deleted between pages.

    query = PageQuery.start("ListSessions", owner=tenant, where=where, page_size=..., token=...,
                            key_shape=(datetime, str))
    rows = await store.list(tenant, where, after=query.after, limit=query.fetch_limit)
    return query.page(rows, key=lambda r: (r.create_time, r.id))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_VERSION = 1

KeyPart = str | int | datetime
Key = tuple[KeyPart, ...]
T = TypeVar("T")


def checked_page_size(requested: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    """The page size a request asks for: 0 means the default, more than the maximum is capped."""
    if requested < 0:
        raise InvalidArgument.field(
            "page_size", f"{requested} is negative; use 1-{MAX_PAGE_SIZE}, or 0 for {default}"
        )
    return min(requested or default, MAX_PAGE_SIZE)


def _bad_token(description: str) -> InvalidArgument:
    return InvalidArgument.field("page_token", description)


_NOT_OURS = (
    "is not a token this service returned; pass next_page_token unchanged, or leave it empty "
    "for the first page"
)


def _fingerprint(method: str, owner: str, where: object) -> str:
    # repr of frozen dataclasses, tuples and scalars is stable across processes and releases.
    return hashlib.sha256(repr((method, owner, where)).encode()).hexdigest()[:16]


def _encode_part(part: KeyPart) -> str | int:
    if isinstance(part, datetime):
        return (part.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    return part


def _decode_part(value: object, kind: type[KeyPart]) -> KeyPart:
    if kind is datetime and type(value) is int:
        return _EPOCH + timedelta(microseconds=value)
    if kind is int and type(value) is int:
        return value
    if kind is str and type(value) is str:
        return value
    raise ValueError(f"{value!r} is not a {kind.__name__}")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


@dataclass(frozen=True)
class PageQuery:
    """One List request's page: how many rows, and after which key."""

    size: int
    after: Key | None
    fingerprint: str

    @property
    def fetch_limit(self) -> int:
        """How many rows to read: one more than the page, to know whether another page follows."""
        return self.size + 1

    @classmethod
    def start(
        cls,
        method: str,
        *,
        owner: str,
        where: object,
        page_size: int,
        token: str,
        key_shape: tuple[type[KeyPart], ...],
        default_size: int = DEFAULT_PAGE_SIZE,
    ) -> PageQuery:
        """Checks page_size and page_token for a List call by `owner` (the tenant or caller the
        listing is scoped to) with filter `where` (any value with a stable repr)."""
        size = checked_page_size(page_size, default_size)
        fingerprint = _fingerprint(method, owner, where)
        if not token:
            return cls(size, None, fingerprint)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body = json.loads(raw)
            version, bound, parts = body["v"], body["f"], body["k"]
            if version != _VERSION or not isinstance(parts, list) or len(parts) != len(key_shape):
                raise ValueError("not a token of this shape")
            after = tuple(_decode_part(v, k) for v, k in zip(parts, key_shape, strict=True))
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError, KeyError, OverflowError):
            raise _bad_token(_NOT_OURS) from None
        if bound != fingerprint:
            raise _bad_token(
                "was returned for a different query; repeat the request with the same filter, or "
                "without a token for the first page"
            )
        return cls(size, after, fingerprint)

    def token_after(self, key: Key) -> str:
        body = {"v": _VERSION, "f": self.fingerprint, "k": [_encode_part(p) for p in key]}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def page(self, rows: Sequence[T], key: Callable[[T], Key]) -> Page[T]:
        """The page from rows read with `fetch_limit`, and the next page's token ("" when this
        page is the last)."""
        if len(rows) <= self.size:
            return Page(list(rows), "")
        items = list(rows[: self.size])
        return Page(items, self.token_after(key(items[-1])))
