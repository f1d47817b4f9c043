"""Tool secrets at rest: AES-256-GCM with a random nonce, bound to tenant/tool, under a key from
CORRAL_SECRETS_KEY. No socket, no database."""

from __future__ import annotations

import base64
import os

import pytest

from services.common.settings import Settings, SettingsError
from services.registry.secrets import NONCE_BYTES, SecretBox, SecretError, parse_key, secret_box

pytestmark = pytest.mark.timeout(10)

SECRET = "sk-live-0123456789abcdef"


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def test_a_sealed_secret_opens_for_its_own_tool(key: bytes) -> None:
    box = SecretBox(key)
    sealed = box.seal(SECRET, tenant="acme", tool="search")
    assert SECRET.encode() not in sealed
    assert box.open(sealed, tenant="acme", tool="search") == SECRET


def test_every_seal_uses_a_fresh_nonce(key: bytes) -> None:
    box = SecretBox(key)
    first, second = (box.seal(SECRET, tenant="acme", tool="search") for _ in range(2))
    assert first != second
    assert first[1 : 1 + NONCE_BYTES] != second[1 : 1 + NONCE_BYTES]


@pytest.mark.parametrize(
    ("tenant", "tool"), [("acme", "other_tool"), ("globex", "search"), ("acme/search", "")]
)
def test_a_ciphertext_moved_to_another_tool_or_tenant_does_not_open(
    key: bytes, tenant: str, tool: str
) -> None:
    box = SecretBox(key)
    sealed = box.seal(SECRET, tenant="acme", tool="search")
    with pytest.raises(SecretError) as info:
        box.open(sealed, tenant=tenant, tool=tool)
    assert SECRET not in str(info.value)


def test_another_key_or_damaged_bytes_do_not_open(key: bytes) -> None:
    sealed = SecretBox(key).seal(SECRET, tenant="acme", tool="search")
    with pytest.raises(SecretError):
        SecretBox(os.urandom(32)).open(sealed, tenant="acme", tool="search")
    damaged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecretError):
        SecretBox(key).open(damaged, tenant="acme", tool="search")
    for bad in (b"", b"\x02" + sealed[1:], sealed[:10]):
        with pytest.raises(SecretError):
            SecretBox(key).open(bad, tenant="acme", tool="search")


def test_the_key_is_base64_of_32_bytes_in_either_alphabet(key: bytes) -> None:
    assert parse_key("") is None
    assert secret_box("") is None
    assert parse_key(base64.b64encode(key).decode()) == key
    assert parse_key(base64.urlsafe_b64encode(key).decode().rstrip("=")) == key
    assert parse_key(f"  {base64.b64encode(key).decode()}\n") == key


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (base64.b64encode(b"x" * 16).decode(), "32 bytes"),
        ("not base64 at all!", "not base64"),
    ],
)
def test_a_malformed_key_names_the_variable_without_echoing_it(value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_key(value)
    assert "CORRAL_SECRETS_KEY" in str(info.value) and says in str(info.value)
    assert value not in str(info.value)


def test_neither_the_box_nor_the_settings_print_the_key(key: bytes) -> None:
    encoded = base64.b64encode(key).decode()
    box = secret_box(encoded)
    assert box is not None and encoded not in repr(box)
    settings = Settings.from_env({"CORRAL_SECRETS_KEY": encoded})
    assert settings.secrets_key == encoded
    assert encoded not in repr(settings)


def test_unicode_secrets_round_trip(key: bytes) -> None:
    box = SecretBox(key)
    assert box.open(box.seal("pässwörd", tenant="t", tool="x"), tenant="t", tool="x") == "pässwörd"


def test_a_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError):
        SecretBox(b"short")
