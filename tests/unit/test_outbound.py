"""The outbound policy without sockets: every spelling of a forbidden address (and more) refused,
gRPC target forms it does not understand refused, every resolved address checked, resolution
failures failing closed, the checked address the one dialled, and where the policy is applied."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Sequence

import httpx
import pytest

from services.common.errors import InvalidArgument
from services.common.outbound import (
    LOOPBACK,
    Destination,
    IPAddress,
    OutboundPolicy,
    OutboundRefused,
    Unresolved,
    parse_allow,
    parse_grpc,
    parse_url,
)
from services.common.outbound_http import PinnedTransport, pinned_client
from services.common.settings import OtlpForward, Settings, SettingsError
from services.executor.broker import check_provider_urls
from services.executor.openai_provider import OpenAIProvider
from services.executor.providers import ProviderError
from services.registry import rollout_rules, tool_rules
from services.registry.destinations import check_destination
from services.telemetry.forward_sink import checked_sink
from tests.fakes.common import FakeResolver

pytestmark = pytest.mark.timeout(10)

PUBLIC = "93.184.216.34"
PUBLIC6 = "2606:2800:220:1::1"
DNS = {
    "good.example": [PUBLIC],
    "api.example.com": [PUBLIC],
    "six.example": [PUBLIC6],
    "localhost": ["127.0.0.1", "::1"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:169.254.169.254"],
    # Several addresses, one of them bad: the bad one is enough to refuse.
    "mixed.test": [PUBLIC, "127.0.0.1"],
    "mixed6.test": [PUBLIC6, "fe80::1"],
    "mixed-private.test": [PUBLIC, "10.1.2.3"],
    "cafe.b2": [PUBLIC],  # hex-looking labels are names unless the last one is a number
    "empty.test": [],
}
PRIVATE = parse_allow("10.0.0.0/8")
ANYWHERE = parse_allow("0.0.0.0/0,::/0")

ALLOWED = "allowed"
REFUSED = "refused"  # the address is forbidden
FORM = "form"  # the target is not something the policy understands
UNRESOLVED = "unresolved"


def policy(allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> OutboundPolicy:
    return OutboundPolicy(tuple(allow), resolver=FakeResolver(DNS))


# (URL, networks allowed, outcome, what the refusal names or the address dialled)
URLS = [
    # The metadata address in every spelling the C library accepts.
    ("http://169.254.169.254/latest/meta-data", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://2852039166/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://0xA9FEA9FE/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://0xa9.0xfe.0xa9.0xfe/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://0251.0376.0251.0376/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://169.254.43518/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://169.254.169.254./", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://169.254.169.254:80/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://[::ffff:169.254.169.254]/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://[::ffff:a9fe:a9fe]/", (), REFUSED, "169.254.169.254, a link-local"),
    ("http://[::169.254.169.254]/", (), REFUSED, "a reserved"),  # IPv4-compatible
    ("http://[64:ff9b::a9fe:a9fe]/", (), REFUSED, "address"),  # NAT64
    ("http://[2002:a9fe:a9fe::1]/", (), REFUSED, "169.254.169.254, a link-local"),  # 6to4
    ("http://metadata.test/", (), REFUSED, "resolves to 169.254.169.254, a link-local"),
    ("http://METADATA.test./", (), REFUSED, "resolves to 169.254.169.254, a link-local"),
    ("http://mapped.test/", (), REFUSED, "resolves to 169.254.169.254, a link-local"),
    ("http://[fe80::1]/", (), REFUSED, "fe80::1, a link-local"),
    ("http://[fe80::1%25eth0]/", (), FORM, "zone"),
    # Unspecified, multicast and broadcast: never, whatever is allowed.
    ("http://0.0.0.0/", ANYWHERE, REFUSED, "0.0.0.0, an unspecified address (never allowed)"),
    ("http://0/", ANYWHERE, REFUSED, "unspecified"),
    ("http://[::]/", ANYWHERE, REFUSED, ":: , an unspecified".replace(" ,", ",")),
    ("http://224.0.0.1/", ANYWHERE, REFUSED, "multicast"),
    ("http://[ff02::1]/", ANYWHERE, REFUSED, "multicast"),
    ("http://255.255.255.255/", ANYWHERE, REFUSED, "broadcast"),
    # Loopback, unless allowed; the mapped form is the IPv4 address, dialled as such.
    ("http://127.0.0.1:8080/", (), REFUSED, "127.0.0.1, a loopback"),
    ("http://127.1/", (), REFUSED, "127.0.0.1, a loopback"),
    ("http://0x7f000001/", (), REFUSED, "127.0.0.1, a loopback"),
    ("http://[::1]/", (), REFUSED, "::1, a loopback"),
    ("http://[::ffff:127.0.0.1]/", (), REFUSED, "127.0.0.1, a loopback"),
    ("http://LocalHost/", (), REFUSED, "loopback"),
    ("http://[::ffff:127.0.0.1]:8080/", LOOPBACK, ALLOWED, "127.0.0.1"),
    ("http://LOCALHOST.:8080/", LOOPBACK, ALLOWED, "127.0.0.1"),
    # Private, unique-local, carrier-grade NAT and reserved ranges, unless allowed.
    ("http://10.1.2.3/", (), REFUSED, "10.1.2.3, a private"),
    ("http://10.1.2.3/", PRIVATE, ALLOWED, "10.1.2.3"),
    ("http://172.16.0.1/", PRIVATE, REFUSED, "private"),
    ("http://192.168.1.1/", PRIVATE, REFUSED, "private"),
    ("http://[fd00::1]/", (), REFUSED, "private"),
    ("http://100.64.0.1/", (), REFUSED, "carrier-grade NAT"),
    ("http://240.0.0.1/", (), REFUSED, "reserved"),
    ("http://198.18.0.1/", (), REFUSED, "private"),
    # Allowing one network allows nothing else a name resolves to.
    ("http://mixed.test/", (), REFUSED, "resolves to 127.0.0.1, a loopback"),
    ("http://mixed6.test/", (), REFUSED, "fe80::1, a link-local"),
    ("http://mixed-private.test/", (), REFUSED, "10.1.2.3"),
    ("http://mixed-private.test/", PRIVATE, ALLOWED, PUBLIC),
    # Userinfo: parsers disagree on where the host starts, so none at all.
    ("http://good@169.254.169.254/", (), FORM, "user@"),
    ("http://169.254.169.254@good.example/", (), FORM, "user@"),
    ("http://user:pw@good.example/", (), FORM, "user@"),
    ("http://good.example\\@169.254.169.254/", (), FORM, "or '\\'"),
    # Forms the policy does not understand.
    ("ftp://good.example/f", (), FORM, "http:// or https://"),
    ("file:///etc/passwd", (), FORM, "http:// or https://"),
    ("http:///path", (), FORM, "with a host"),
    ("http://exa mple.com/", (), FORM, "without spaces"),
    ("http://bücher.example/", (), FORM, "ASCII"),
    ("http://1.2.3.4.5/", (), FORM, "not a valid IPv4"),
    ("http://999.1.1.1/", (), FORM, "not a valid IPv4"),
    ("http://tools.internal.0x1/", (), FORM, "not a valid IPv4"),
    ("http://a.b.c.4/", (), FORM, "not a valid IPv4"),
    ("http://%31%32%37.0.0.1/", (), FORM, "not a valid IPv4"),
    ("http://%6c%6fcalhost/", (), FORM, "not a host name"),
    ("http://good.example:0/", (), FORM, "port"),
    ("http://good.example:99999/", (), FORM, "not a valid URL"),
    ("http://[::1/", (), FORM, "not a valid URL"),
    # Resolution failures fail closed.
    ("http://nowhere.test/", (), UNRESOLVED, "does not resolve"),
    ("http://empty.test/", (), UNRESOLVED, "no address"),
    # Public destinations, in any case, with or without a trailing dot.
    ("https://api.example.com/v1/chat", (), ALLOWED, PUBLIC),
    ("http://cafe.b2/", (), ALLOWED, PUBLIC),
    ("HTTPS://API.Example.COM./v1", (), ALLOWED, PUBLIC),
    ("http://six.example:8080/", (), ALLOWED, PUBLIC6),
    (f"http://[{PUBLIC6}]/", (), ALLOWED, PUBLIC6),
    (f"http://{PUBLIC}/", (), ALLOWED, PUBLIC),
]

# (gRPC tool address, networks allowed, outcome, what the refusal names or the gRPC target dialled)
GRPC = [
    ("ipv4:169.254.169.254:82", ANYWHERE, FORM, "'ipv4:' is not supported"),
    ("ipv6:[::1]:50051", ANYWHERE, FORM, "'ipv6:' is not supported"),
    ("unix:/run/tool.sock", ANYWHERE, FORM, "'unix:' is not supported"),
    ("unix:///run/tool.sock", ANYWHERE, FORM, "'unix:' is not supported"),
    ("unix-abstract:tool", ANYWHERE, FORM, "'unix-abstract:' is not supported"),
    ("vsock:2:50051", ANYWHERE, FORM, "'vsock:' is not supported"),
    ("xds:///tool", ANYWHERE, FORM, "'xds:' is not supported"),
    ("passthrough:///good.example:50051", ANYWHERE, FORM, "'passthrough:' is not supported"),
    ("dns://8.8.8.8/good.example:50051", ANYWHERE, FORM, "'dns:' is not supported"),
    ("dns:good.example:50051", ANYWHERE, FORM, "'dns:' is not supported"),
    ("http://good.example:50051", ANYWHERE, FORM, "not supported"),
    ("good.example", (), FORM, "host:port"),
    ("good.example:0", (), FORM, "host:port"),
    (":50051", (), FORM, "host:port"),
    ("good.example:50051/x", (), FORM, "host:port"),
    ("dns:///metadata.test:82", (), REFUSED, "169.254.169.254, a link-local"),
    ("DNS:///localhost:50051", (), REFUSED, "a loopback"),
    ("169.254.169.254:82", (), REFUSED, "169.254.169.254, a link-local"),
    ("0xA9FEA9FE:82", (), REFUSED, "169.254.169.254, a link-local"),
    ("[::ffff:169.254.169.254]:82", (), REFUSED, "169.254.169.254, a link-local"),
    ("[::ffff:127.0.0.1]:50051", (), REFUSED, "127.0.0.1, a loopback"),
    ("localhost:50051", (), REFUSED, "a loopback"),
    ("[::]:50051", ANYWHERE, REFUSED, "unspecified"),
    ("0.0.0.0:50051", ANYWHERE, REFUSED, "unspecified"),
    ("mixed.test:50051", (), REFUSED, "127.0.0.1, a loopback"),
    ("nowhere.test:50051", (), UNRESOLVED, "does not resolve"),
    ("good.example:50051", (), ALLOWED, f"ipv4:{PUBLIC}:50051"),
    ("dns:///Good.Example.:50051", (), ALLOWED, f"ipv4:{PUBLIC}:50051"),
    ("six.example:443", (), ALLOWED, f"ipv6:[{PUBLIC6}]:443"),
    ("[::ffff:127.0.0.1]:50051", LOOPBACK, ALLOWED, "ipv4:127.0.0.1:50051"),
    ("localhost:50051", LOOPBACK, ALLOWED, "ipv4:127.0.0.1:50051"),
]


async def _outcome(check: Awaitable[Destination]) -> tuple[str, str]:
    try:
        destination = await check
    except Unresolved as exc:
        return UNRESOLVED, str(exc)
    except OutboundRefused as exc:
        return (REFUSED if "is refused" in str(exc) else FORM), str(exc)
    return ALLOWED, str(destination)


@pytest.mark.parametrize(("url", "allow", "expected", "detail"), URLS)
async def test_urls(url: str, allow: tuple[ipaddress.IPv4Network, ...], expected: str, detail: str) -> None:
    p = policy(allow)
    outcome, message = await _outcome(p.check_url(url))
    assert (outcome, detail in message) == (expected, True), message
    if expected == ALLOWED:
        destination = await p.check_url(url)
        assert str(destination.address) == detail
        assert destination.target.host == destination.target.host.lower().rstrip(".")


@pytest.mark.parametrize(("address", "allow", "expected", "detail"), GRPC)
async def test_grpc_addresses(
    address: str, allow: tuple[ipaddress.IPv4Network, ...], expected: str, detail: str
) -> None:
    p = policy(allow)
    outcome, message = await _outcome(p.check_grpc(address))
    if expected == ALLOWED:
        assert outcome == ALLOWED, message
        assert (await p.check_grpc(address)).grpc_target == detail
    else:
        assert (outcome, detail in message) == (expected, True), message


async def test_a_name_is_dialled_with_its_own_name_as_the_authority() -> None:
    destination = await policy().check_grpc("dns:///Good.Example:50051")
    assert destination.target.authority == "good.example:50051"
    six = await policy().check_grpc(f"[{PUBLIC6}]:443")
    assert six.target.authority == f"[{PUBLIC6}]:443"


async def test_a_lookup_that_hangs_fails_closed() -> None:
    class Hanging:
        async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
            await asyncio.sleep(60)
            return [ipaddress.ip_address(PUBLIC)]

    slow = OutboundPolicy(resolver=Hanging(), timeout_s=0.05)
    with pytest.raises(Unresolved, match="did not resolve within 0.05s"):
        await slow.check_url("https://good.example/")


async def test_allow_lists_parse_and_name_what_is_wrong() -> None:
    assert parse_allow(" 127.0.0.0/8, ::1 ,10.0.0.0/8,") == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    with pytest.raises(SettingsError, match=r"CORRAL_OUTBOUND_ALLOW: 'intranet' is not a CIDR"):
        Settings.from_env({"CORRAL_OUTBOUND_ALLOW": "10.0.0.0/8,intranet"})
    settings = Settings.from_env({"CORRAL_OUTBOUND_ALLOW": "10.0.0.0/8"})
    assert settings.outbound_allow == PRIVATE
    # CORRAL_TOOLS_ALLOW_LOOPBACK=true (what `make run` and the tests set) adds loopback.
    loopback = Settings.from_env({"CORRAL_OUTBOUND_ALLOW": "10.0.0.0/8",
                                  "CORRAL_TOOLS_ALLOW_LOOPBACK": "true"})
    assert loopback.outbound_allow == PRIVATE + LOOPBACK
    assert Settings.from_env({}).outbound_allow == ()


def test_parsing_keeps_the_name_for_host_header_and_tls() -> None:
    target = parse_url("HTTPS://API.Example.COM.:8443/v1")
    assert (target.scheme, target.host, target.port, target.literal) == (
        "https", "api.example.com", 8443, None)
    assert parse_url("http://good.example").port == 80
    assert parse_grpc("[::1]:50051").literal == ipaddress.ip_address("::1")


# -- the httpx transport: checked, pinned, one lookup, no redirects ------------------------------


class Recorder:
    """A transport standing in for the connection pool: what it was asked to dial."""

    def __init__(self, response: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.response = response or httpx.Response(200, text="ok")

    def pool(self) -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response


async def test_the_transport_dials_the_checked_address_under_the_original_name() -> None:
    resolver = FakeResolver(DNS)
    recorder = Recorder()
    client = httpx.AsyncClient(transport=PinnedTransport(
        OutboundPolicy(resolver=resolver), pool=recorder.pool), trust_env=False)
    async with client:
        response = await client.post("https://API.example.com:8443/v1?q=1", content=b"{}")
    assert response.status_code == 200
    [sent] = recorder.requests
    assert str(sent.url) == f"https://{PUBLIC}:8443/v1?q=1"
    assert sent.headers["host"] == "api.example.com:8443"
    assert sent.extensions["sni_hostname"] == "api.example.com"  # TLS name and verification
    assert resolver.lookups == ["api.example.com"]  # one lookup: the pool dials an address


async def test_the_next_checked_address_is_tried_when_connecting_fails() -> None:
    """A name with two allowed addresses, the first down: the second is dialled, and nothing
    else (the fake answers both, and a third address is never asked for)."""
    dialled: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        dialled.append(request.url.host)
        if request.url.host == PUBLIC6:
            raise httpx.ConnectError("network unreachable", request=request)
        return httpx.Response(200, text="ok")

    names = FakeResolver({"dual.example": [PUBLIC6, PUBLIC]})
    client = pinned_client(OutboundPolicy(resolver=names), pool=lambda: httpx.MockTransport(handle))
    async with client:
        assert (await client.get("http://dual.example/")).status_code == 200
        names.names["dual.example"] = [ipaddress.ip_address(PUBLIC6)]
        with pytest.raises(httpx.ConnectError):
            await client.get("http://dual.example/")
    assert dialled == [PUBLIC6, PUBLIC, PUBLIC6]


async def test_the_transport_refuses_before_connecting() -> None:
    recorder = Recorder()
    client = httpx.AsyncClient(transport=PinnedTransport(
        OutboundPolicy(resolver=FakeResolver(DNS)), pool=recorder.pool), trust_env=False)
    async with client:
        for url in ("http://metadata.test/", "http://[::ffff:169.254.169.254]/",
                    "http://nowhere.test/", "http://good@good.example/"):
            with pytest.raises(OutboundRefused):
                await client.get(url)
    assert recorder.requests == []


async def test_a_name_rebound_between_calls_is_checked_again() -> None:
    """A rebinding DNS server answers a public address first, then the metadata address: the
    first call dials the public one it checked, the second is refused before any connection."""
    answers = iter([[PUBLIC], ["169.254.169.254"]])

    class Rebinding:
        async def resolve(self, host: str, port: int) -> Sequence[IPAddress]:
            return [ipaddress.ip_address(a) for a in next(answers)]

    recorder = Recorder()
    client = httpx.AsyncClient(transport=PinnedTransport(
        OutboundPolicy(resolver=Rebinding()), pool=recorder.pool), trust_env=False)
    async with client:
        await client.get("http://rebind.test/")
        with pytest.raises(OutboundRefused, match="169.254.169.254"):
            await client.get("http://rebind.test/")
    assert [r.url.host for r in recorder.requests] == [PUBLIC]


async def test_redirects_are_answers_not_followed() -> None:
    recorder = Recorder(httpx.Response(302, headers={"Location": "http://169.254.169.254/"}))
    client = pinned_client(OutboundPolicy(resolver=FakeResolver(DNS)), pool=recorder.pool)
    async with client:
        response = await client.get("http://good.example/hook")
    assert response.status_code == 302 and len(recorder.requests) == 1
    assert not client.follow_redirects and not client.trust_env


# -- where the policy is applied --------------------------------------------------------------


async def test_the_model_provider_url_is_checked_at_start() -> None:
    strict = policy()
    with pytest.raises(SettingsError, match=r"CORRAL_OPENAI_BASE_URL=.*link-local.*CORRAL_OUTBOUND_ALLOW"):
        await check_provider_urls({"CORRAL_OPENAI_BASE_URL": "http://169.254.169.254/v1"}, strict)
    with pytest.raises(SettingsError, match="loopback"):
        await check_provider_urls({"CORRAL_OPENAI_BASE_URL": "http://localhost:11434/v1"}, strict)
    await check_provider_urls({"CORRAL_OPENAI_BASE_URL": "http://localhost:11434/v1"}, policy(LOOPBACK))
    await check_provider_urls({"CORRAL_OPENAI_BASE_URL": "https://api.example.com/v1"}, strict)
    await check_provider_urls({"CORRAL_OPENAI_BASE_URL": "http://nowhere.test/v1"}, strict)  # logged
    await check_provider_urls({}, strict)


async def test_a_model_call_to_a_refused_address_is_a_model_error() -> None:
    provider = OpenAIProvider("http://metadata.test/v1", None, outbound=policy(), max_attempts=1)
    try:
        with pytest.raises(ProviderError, match="link-local") as caught:
            await provider.complete("m", {}, "hello", "")
    finally:
        await provider.aclose()
    assert caught.value.error_type == "destination_refused"


@pytest.mark.parametrize(("kind", "address"), [
    ("grpc", "ipv4:169.254.169.254:82"), ("grpc", "unix:/run/x.sock"), ("grpc", "dns://1.1.1.1/x:1"),
    ("http", "http://good@169.254.169.254/"),
])
def test_tool_addresses_in_forms_the_policy_refuses_name_the_field(kind: str, address: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        tool_rules.check_address(kind, address, "tool.address")  # type: ignore[arg-type]
    assert caught.value.violations[0].field == "tool.address"


async def test_destinations_are_refused_when_given_unless_they_do_not_resolve_yet() -> None:
    strict = policy()
    for url in ("http://169.254.169.254/hook", "http://metadata.test/hook", "http://0xA9FEA9FE/"):
        with pytest.raises(InvalidArgument) as caught:
            await check_destination(strict, rollout_rules.webhook_target(url, "rollout.webhook_url"),
                                    "rollout.webhook_url")
        assert caught.value.violations[0].field == "rollout.webhook_url"
        assert caught.value.reason == "DESTINATION_NOT_ALLOWED"
    # Registered before its DNS exists: accepted now, checked (and failing closed) at each call.
    await check_destination(strict, parse_url("http://nowhere.test/hook"), "rollout.webhook_url")
    with pytest.raises(InvalidArgument, match="experiment.webhook_url"):
        rollout_rules.check_webhook_url("ftp://x.example/", "experiment.webhook_url")


async def test_the_otlp_forward_target_is_checked_at_start() -> None:
    def forward(endpoint: str) -> OtlpForward:
        return OtlpForward(endpoint=endpoint)

    with pytest.raises(SettingsError, match=r"CORRAL_OTLP_FORWARD=.*link-local.*CORRAL_OUTBOUND_ALLOW"):
        await checked_sink(forward("http://metadata.test:4317"), policy())
    with pytest.raises(SettingsError, match="loopback"):
        await checked_sink(forward("localhost:4317"), policy())
    with pytest.raises(SettingsError, match="name the port"):
        await checked_sink(forward("https://api.example.com"), policy())
    for allowed in ("https://api.example.com:4317", "nowhere.test:4317"):  # the second is logged
        sink = await checked_sink(forward(allowed), policy())
        await sink.close()
    local = await checked_sink(forward("localhost:4317"), policy(LOOPBACK))
    assert local.target == "localhost:4317"
    await local.close()


def test_forwarding_headers_are_read_once_and_kept_out_of_logs() -> None:
    settings = Settings.from_env({"CORRAL_OTLP_FORWARD": "collector:4317",
                                  "CORRAL_OTLP_FORWARD_HEADERS": "X-Api-Key=s3cr%3Dt, x-team=obs"})
    assert settings.otlp_forward.headers == (("x-api-key", "s3cr=t"), ("x-team", "obs"))
    assert "s3cr" not in repr(settings)
    with pytest.raises(SettingsError, match="CORRAL_OTLP_FORWARD_HEADERS must be key=value"):
        Settings.from_env({"CORRAL_OTLP_FORWARD_HEADERS": "Authorization: Bearer x"})
