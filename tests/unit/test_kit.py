"""The server kit's shared rules: resource names, page tokens, the error table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import grpc
import pytest

from corral import names
from services.common.errors import Aborted, CorralError, InvalidArgument, NotFound
from services.common.interceptors import Handler, WrappedHandlers
from services.common.paging import PageQuery
from services.common.status import STATUS_CODES, domain_error, status_code


@pytest.mark.parametrize(
    ("ref", "text"),
    [
        (names.AgentRef("progress-report"), "agents/progress-report"),
        (names.VersionRef("a", 12), "agents/a/versions/12"),
        (names.EndpointRef("a", "prod"), "agents/a/endpoints/prod"),
        (names.RolloutRef(names.EndpointRef("a", "prod"), 3), "agents/a/endpoints/prod/rollouts/3"),
        (names.RolloutRef(names.EndpointRef("a", "prod"), None), "agents/a/endpoints/prod/rollouts/-"),
        (names.ExperimentRef(names.EndpointRef("a", "p"), 1), "agents/a/endpoints/p/experiments/1"),
        (names.SessionRef("s-1:x"), "sessions/s-1:x"),
        (names.ToolRef("session_data"), "tools/session_data"),
    ],
)
def test_names_round_trip(ref: object, text: str) -> None:
    assert str(ref) == text
    assert type(ref).parse(text) == ref  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (names.AgentRef.parse, "agents/Upper"),
        (names.AgentRef.parse, "agents/a/versions/1"),
        (names.VersionRef.parse, "agents/a/versions/0"),
        (names.VersionRef.parse, "agents/a/versions/sha256:" + "0" * 64),
        (names.EndpointRef.parse, "agents/a/endpoints/9lives"),
        (names.RolloutRef.parse, "agents/a/endpoints/p/experiments/1"),
        (names.RolloutRef.parse, "agents/a/endpoints/p/rollouts/x"),
        (names.SessionRef.parse, "sessions/"),
        (names.ToolRef.parse, "tools/a/b"),
        (names.AgentRef.parse, ""),
    ],
)
def test_malformed_names_name_the_field(parse: object, text: str) -> None:
    with pytest.raises(names.ResourceNameError) as info:
        parse(text, field="filter.agent")  # type: ignore[operator]
    assert info.value.field == "filter.agent"
    error = domain_error(info.value)
    assert isinstance(error, InvalidArgument)
    assert [v.field for v in error.violations] == ["filter.agent"]


def test_a_digest_names_a_version_only_where_allowed() -> None:
    digest = "sha256:" + "ab" * 32
    ref = names.VersionRef.parse(f"agents/a/versions/{digest}", allow_digest=True)
    assert ref == names.VersionRef("a", digest=digest)


def test_every_domain_error_has_a_status_code() -> None:
    for cls in CorralError.__subclasses__():
        assert cls in STATUS_CODES, cls
    assert status_code(Aborted("x")) == grpc.StatusCode.ABORTED


@dataclass(frozen=True)
class Where:
    agent: str = ""


def start(token: str = "", where: Where = Where(), owner: str = "t1", size: int = 2) -> PageQuery:
    return PageQuery.start(
        "ListThings", owner=owner, where=where, page_size=size, token=token,
        key_shape=(datetime, str),
    )


def test_a_page_token_continues_after_the_last_row() -> None:
    rows = [(datetime(2026, 1, d, tzinfo=UTC), f"r{d}") for d in (1, 2, 3)]
    first = start().page(rows, key=lambda r: r)
    assert first.items == rows[:2] and first.next_page_token
    assert start(first.next_page_token).after == rows[1]
    last = start(first.next_page_token).page(rows[2:], key=lambda r: r)
    assert last.items == rows[2:] and last.next_page_token == ""


def test_a_page_token_only_continues_its_own_query() -> None:
    rows = [(datetime(2026, 1, d, tzinfo=UTC), f"r{d}") for d in (1, 2, 3)]
    token = start().page(rows, key=lambda r: r).next_page_token
    for other in (
        lambda: start(token, where=Where("agents/x")),
        lambda: start(token, owner="t2"),
        lambda: start("garbage!"),
        lambda: start(token[:-4]),
    ):
        with pytest.raises(InvalidArgument) as info:
            other()
        assert [v.field for v in info.value.violations] == ["page_token"]


def test_page_sizes() -> None:
    assert start(size=0).size == 50
    assert start(size=5000).size == 1000
    with pytest.raises(InvalidArgument) as info:
        start(size=-1)
    assert [v.field for v in info.value.violations] == ["page_size"]


def test_not_a_domain_error() -> None:
    assert domain_error(ValueError("x")) is None
    assert isinstance(domain_error(NotFound("gone")), NotFound)


def test_an_interceptor_wraps_each_methods_handler_once() -> None:
    """Wrapping a handler on every call would cost every call: the wrapped handler is kept per
    method, and made again only if the server hands out another handler for it."""
    wrapped = WrappedHandlers()
    made: list[str] = []

    def wrap(name: str) -> Callable[[], Handler]:
        def make() -> Handler:
            made.append(name)
            return cast(Handler, object())

        return make

    first, second = cast(Handler, object()), cast(Handler, object())
    a = wrapped.get("/s/M", first, wrap("first"))
    assert wrapped.get("/s/M", first, wrap("again")) is a
    assert wrapped.get("/s/M", second, wrap("second")) is not a
    assert made == ["first", "second"]
