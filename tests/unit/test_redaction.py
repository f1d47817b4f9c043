"""A tool's credentials blanked out of its answer in every form redaction.py knows, for secrets
with characters that change under each encoding; the span event that tells operators; and the
per-call token the broker mints, revokes and keeps from the agent."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.executor.model import (
    TOOL_ERROR,
    UNAVAILABLE,
    Credential,
    ResolvedTool,
    ToolCall,
    ToolFailure,
    ToolOutcome,
)
from services.executor.redaction import REDACTED, Secret, redact
from services.executor.tools import REDACTED_EVENT, ToolBroker
from tests.fakes.executor import FixedTokens

pytestmark = pytest.mark.timeout(10)

SECRETS = {
    "plain": "sk-live-4f9a1c7e2b8d6035",
    "quote": 'pa"ss"word-1234567',
    "backslash": "C:\\keys\\tool\\secret-42",
    "unicode": "pässwörd-ключ-🔑-2026",
    "base64ish": "ab/cd+ef==gh/ij+kl=mn",
    "control": "tab\there-newline\nthere-bell\x07",
}
SECRET_IDS = list(SECRETS)


def _hides(data: bytes, secret: str) -> bool:
    return secret.encode() not in data and REDACTED in data


def _redact(data: bytes, secret: str) -> tuple[bytes, frozenset[str]]:
    done = redact(data, [Secret("tool_secret", secret)])
    return done.data, done.found.forms


@pytest.mark.parametrize("name", SECRET_IDS)
def test_the_raw_secret(name: str) -> None:
    secret = SECRETS[name]
    data, forms = _redact(f"key is {secret}, really".encode(), secret)
    assert data == b"key is [redacted], really" and forms == {"raw"}


@pytest.mark.parametrize("name", SECRET_IDS)
@pytest.mark.parametrize("style", ["python", "javascript", "upper-hex", "escaped-slash"])
def test_a_json_echo_stays_valid_json_without_the_secret(name: str, style: str) -> None:
    secret = SECRETS[name]
    body = {
        "python": json.dumps({"headers": {"X-Corral-Tool-Secret": secret}}),
        "javascript": json.dumps({"headers": {"X-Corral-Tool-Secret": secret}}, ensure_ascii=False),
        # Java and .NET write \\u escapes in upper-case hex; PHP escapes the slash.
        "upper-hex": _upper_hex(json.dumps({"headers": {"X-Corral-Tool-Secret": secret}})),
        "escaped-slash": json.dumps({"headers": {"X-Corral-Tool-Secret": secret}}).replace("/", "\\/"),
    }[style]
    data, forms = _redact(body.encode(), secret)
    assert json.loads(data) == {"headers": {"X-Corral-Tool-Secret": "[redacted]"}}
    assert forms <= {"raw", "json"} and forms
    assert secret not in json.loads(data)["headers"]["X-Corral-Tool-Secret"]


@pytest.mark.parametrize("name", SECRET_IDS)
@pytest.mark.parametrize("encode", [
    lambda s: quote(s, safe=""), quote, quote_plus,
    lambda s: _lower_percent(quote(s, safe="")),  # %2f rather than %2F, as some clients write
], ids=["quote-safe-none", "quote", "quote_plus", "lower-case-escapes"])
def test_a_url_encoded_echo(name: str, encode: Callable[[str], str]) -> None:
    secret = SECRETS[name]
    encoded = encode(secret)
    data, forms = _redact(f"https://tool.example/cb?key={encoded}&x=1".encode(), secret)
    assert data == b"https://tool.example/cb?key=[redacted]&x=1"
    assert forms <= {"url", "raw"} and forms


@pytest.mark.parametrize("name", SECRET_IDS)
@pytest.mark.parametrize("alphabet", ["standard", "urlsafe"])
@pytest.mark.parametrize("padded", [True, False])
def test_the_secret_base64_encoded_on_its_own(name: str, alphabet: str, padded: bool) -> None:
    secret = SECRETS[name]
    encode = base64.b64encode if alphabet == "standard" else base64.urlsafe_b64encode
    encoded = encode(secret.encode())
    if not padded:
        encoded = encoded.rstrip(b"=")
    data, forms = _redact(b'{"echo": "' + encoded + b'"}', secret)
    assert data == b'{"echo": "[redacted]"}'
    assert forms in ({"base64"}, {"base64url"})  # the two alphabets agree without + and /


@pytest.mark.parametrize("name", SECRET_IDS)
@pytest.mark.parametrize("prefix", [b"", b"x", b"xy", b"Authorization: Bearer abc\n"])
@pytest.mark.parametrize("alphabet", ["standard", "urlsafe"])
def test_the_secret_inside_a_larger_base64_blob_at_every_offset(
    name: str, prefix: bytes, alphabet: str
) -> None:
    secret = SECRETS[name]
    encode = base64.b64encode if alphabet == "standard" else base64.urlsafe_b64encode
    for suffix in (b"", b"!", b"!?", b"\n-- the whole request"):
        blob = encode(prefix + b"X-Corral-Tool-Secret: " + secret.encode() + suffix)
        data, forms = _redact(blob, secret)
        assert REDACTED in data and forms in ({"base64"}, {"base64url"})
        for piece in data.split(REDACTED):
            assert secret.encode() not in _decoded_any_alignment(piece)


@pytest.mark.parametrize("name", SECRET_IDS)
def test_base64_of_a_json_echo(name: str) -> None:
    secret = SECRETS[name]
    blob = base64.b64encode(json.dumps({"headers": {"X-Corral-Tool-Secret": secret}}).encode())
    data, forms = _redact(blob, secret)
    assert REDACTED in data and forms & {"base64", "base64(json)"}
    for piece in data.split(REDACTED):
        decoded = _decoded_any_alignment(piece)
        assert secret.encode() not in decoded
        assert json.dumps(secret)[1:-1].encode() not in decoded


@pytest.mark.parametrize("name", SECRET_IDS)
def test_a_reversed_echo(name: str) -> None:
    secret = SECRETS[name]
    data, forms = _redact(f"[{secret[::-1]}]".encode(), secret)
    assert data == b"[[redacted]]" and forms == {"reversed"}


def test_every_form_in_one_answer_is_named_once() -> None:
    secret = SECRETS["quote"]
    body = " ".join([
        secret, json.dumps(secret), quote_plus(secret), base64.b64encode(secret.encode()).decode(),
        base64.urlsafe_b64encode(secret.encode()).decode().rstrip("="), secret[::-1],
    ]).encode()
    data, forms = _redact(body, secret)
    assert forms - {"base64url"} == {"raw", "json", "url", "base64", "reversed"}
    assert secret.encode() not in data and json.dumps(secret)[1:-1].encode() not in data


def test_nothing_found_changes_nothing() -> None:
    body = b'{"answer": 42, "blob": "c2stbGl2ZQ=="}'
    done = redact(body, [Secret("tool_secret", SECRETS["plain"]), Secret("call_token", "")])
    assert done.data == body and not done.found


def test_whose_credential_it_was_is_named() -> None:
    token = "eyJhbGciOiJFZERTQSJ9.eyJhdWQiOlsid2ViIl19.c2lnbmF0dXJlLWJ5dGVz"
    done = redact(f"auth={token}".encode(), [Secret("tool_secret", "abc-secret-xyz"),
                                                 Secret("call_token", token)])
    assert done.data == b"auth=[redacted]" and done.found.kinds == {"call_token"}


def test_a_secret_never_appears_in_a_repr() -> None:
    secret = SECRETS["plain"]
    assert secret not in repr(Secret("tool_secret", secret))
    assert secret not in repr(ResolvedTool("t", "http", "http://x", 1.0, secret=secret))


# -- the broker: the span event and the call's own token ---------------------------------------


class OneTool:
    async def resolve(self, tenant: str, tool: str, timeout_s: float) -> ResolvedTool | None:
        return ResolvedTool(tool, "http", "http://tool.invalid/x", 5.0, secret=SECRETS["quote"])

    async def close(self) -> None:
        return None


class Echoes:
    """A tool that echoes what it was sent: as JSON, or in the error it answers with."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[ToolCall] = []

    async def send(self, call: ToolCall) -> ToolOutcome:
        self.calls.append(call)
        echoed = json.dumps({"secret": call.tool.secret, "auth": f"Bearer {call.token}"})
        if self.fail:
            from services.executor.tool_transport import _short  # what the transport answers

            excerpt, found = _short(echoed, call)
            raise ToolFailure(TOOL_ERROR, f"tool answered HTTP 500: {excerpt}", redacted=found)
        return ToolOutcome(payload=echoed.encode(), content_type=f"text/x-{call.tool.secret}")

    async def close(self) -> None:
        return None


async def _call(transport: Echoes, tokens: FixedTokens) -> tuple[ToolOutcome, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = ToolBroker(resolver=OneTool(), transport=transport, tracer=provider.get_tracer("t"))
    outcome = await broker.call(
        tenant="acme", tool="web", allowed=("web",), tokens=tokens, payload=b"{}",
        content_type="application/json", timeout_s=2.0, deadline=time.time() + 30,
        attributes={"corral.invocation": "inv-1"}, context=None,
    )
    return outcome, exporter


async def test_a_redaction_is_an_event_on_the_tool_span_without_the_secret() -> None:
    tokens = FixedTokens("eyJhbGciOiJFZERTQSJ9.eyJhdWQiOiJ3ZWIifQ.c2lnbmF0dXJl")
    outcome, exporter = await _call(Echoes(), tokens)
    assert json.loads(outcome.payload) == {"secret": "[redacted]", "auth": "Bearer [redacted]"}
    assert outcome.content_type == "text/x-[redacted]"
    [span] = exporter.get_finished_spans()
    [event] = [e for e in span.events if e.name == REDACTED_EVENT]
    attrs = dict(event.attributes or {})
    assert set(attrs["corral.tool.redacted_forms"]) == {"json", "raw"}  # type: ignore[arg-type]
    assert set(attrs["corral.tool.redacted_credentials"]) == {  # type: ignore[arg-type]
        "tool_secret", "call_token"}
    text = span.to_json()
    assert SECRETS["quote"] not in text and json.dumps(SECRETS["quote"])[1:-1] not in text
    assert tokens.token not in text


async def test_an_error_that_echoes_the_secret_is_redacted_and_recorded() -> None:
    outcome, exporter = await _call(Echoes(fail=True), FixedTokens("tok-" + "9" * 20))
    assert outcome.error_code == TOOL_ERROR and "[redacted]" in outcome.error
    assert SECRETS["quote"] not in outcome.error and json.dumps(SECRETS["quote"])[1:-1] not in outcome.error
    [span] = exporter.get_finished_spans()
    assert [e.name for e in span.events] == [REDACTED_EVENT]


async def test_a_clean_answer_records_no_event() -> None:
    class Clean(Echoes):
        async def send(self, call: ToolCall) -> ToolOutcome:
            return ToolOutcome(payload=b'{"answer": 42}', content_type="application/json")

    outcome, exporter = await _call(Clean(), FixedTokens("tok"))
    assert outcome.payload == b'{"answer": 42}'
    [span] = exporter.get_finished_spans()
    assert list(span.events) == []


async def test_each_call_gets_a_token_for_its_tool_until_its_limit_then_revoked() -> None:
    transport, tokens = Echoes(), FixedTokens("tok")
    before = time.time()
    await _call(transport, tokens)
    [(tool, expires_at)] = tokens.minted
    # The call's timeout (2 s) is the least of the three limits here.
    assert tool == "web" and before + 2 - 0.5 <= expires_at <= time.time() + 2
    assert [c.jti for c in tokens.revoked] == ["jti-1"]
    assert transport.calls[0].token == "tok"


def _decoded_any_alignment(piece: bytes) -> bytes:
    """Everything a reader could decode out of a base64 fragment, whichever alphabet and
    alignment it was cut at."""
    out = b""
    for start in range(4):
        chunk = piece[start:]
        chunk = chunk[: len(chunk) // 4 * 4]
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                out += decode(chunk) + b"|"
            except (binascii.Error, ValueError):
                pass
    return out


def _upper_hex(text: str) -> str:
    import re

    return re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(), text)


def _lower_percent(text: str) -> str:
    import re

    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


async def test_a_token_that_cannot_be_minted_fails_the_call_not_the_turn() -> None:
    class Broken(FixedTokens):
        def mint(self, tool: str, expires_at: float) -> Credential:
            raise ValueError("no signing key")

    transport = Echoes()
    outcome, _ = await _call(transport, Broken("tok"))
    assert outcome.error_code == UNAVAILABLE and "could not mint" in outcome.error
    assert transport.calls == [], "nothing is sent without its token"
