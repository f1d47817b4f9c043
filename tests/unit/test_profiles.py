"""Connection profiles (corral/profiles.py): which platform the corral command calls, with which
credential, over TLS or not, as the config file and the root options say. No socket is opened."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.cli import State, cli
from corral.config import DEFAULT_ADDRS
from corral.profiles import ConnectionOptions, Profile, ProfileError, client_config, resolve

PROD = """
default = "staging"

[profiles.prod]
address = "corral.example.com:443"
api_key_file = "keys/prod.key"
ca = "prod-ca.pem"

[profiles.staging]
address = "staging.example.com:8443"
token = "eyJ.header.sig"
tls = true

[profiles.local]
address = "127.0.0.1:8080"
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose config file is tmp_path/config.toml (PROD), with the files it names."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "prod.key").write_text("crl_prodkey\n")
    (tmp_path / "prod-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "config.toml").write_text(PROD)
    return {"CORRAL_CONFIG": str(tmp_path / "config.toml"), "HOME": str(tmp_path / "home")}


def test_without_a_config_file_nothing_changes(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "CORRAL_ROUTER_ADDR": "10.0.0.1:50051"}
    assert resolve(ConnectionOptions(), env) == Profile()
    config = client_config(ConnectionOptions(), env)
    assert config.addrs == {**DEFAULT_ADDRS, "router": "10.0.0.1:50051"}
    assert (config.tls, config.ca_file) == (False, None)


def test_the_file_is_found_under_xdg_config_home_then_home(tmp_path: Path) -> None:
    (tmp_path / "xdg" / "corral").mkdir(parents=True)
    (tmp_path / "xdg" / "corral" / "config.toml").write_text(
        '[profiles.x]\naddress = "x.example.com:443"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    assert resolve(ConnectionOptions(profile="x"), env).address == "x.example.com:443"
    with pytest.raises(ProfileError, match="no profile 'x'"):
        resolve(ConnectionOptions(profile="x"), {"HOME": str(tmp_path)})


def test_a_named_profile_sends_every_service_to_its_address_over_tls(
    env: dict[str, str], tmp_path: Path
) -> None:
    profile = resolve(ConnectionOptions(profile="prod"), env)
    # The key file is read (relative to the config file), the CA implies TLS.
    assert profile == Profile("prod", "corral.example.com:443", "crl_prodkey", "",
                              tmp_path / "prod-ca.pem", True)
    config = client_config(ConnectionOptions(profile="prod"),
                           {**env, "CORRAL_REGISTRY_ADDR": "127.0.0.1:1"})
    assert set(config.addrs.values()) == {"corral.example.com:443"}
    assert (config.tls, config.ca_file) == (True, tmp_path / "prod-ca.pem")


def test_the_files_default_profile_applies_when_none_is_named(env: dict[str, str]) -> None:
    profile = resolve(ConnectionOptions(), env)
    assert (profile.name, profile.token, profile.tls, profile.ca) == (
        "staging", "eyJ.header.sig", True, None)


def test_a_profile_without_a_ca_or_tls_is_plaintext(env: dict[str, str]) -> None:
    assert resolve(ConnectionOptions(profile="local"), env).tls is False


def test_root_options_override_the_profile(env: dict[str, str], tmp_path: Path) -> None:
    other_ca = tmp_path / "other.pem"
    other_ca.write_text("pem")
    profile = resolve(ConnectionOptions("local", "edge.internal:9443", other_ca), env)
    assert (profile.address, profile.ca, profile.tls) == ("edge.internal:9443", other_ca, True)
    assert resolve(ConnectionOptions("prod", tls=False), env).tls is False
    assert resolve(ConnectionOptions("local", tls=True), env).tls is True


def test_an_explicit_credential_wins_over_the_profiles(env: dict[str, str]) -> None:
    prod = resolve(ConnectionOptions(profile="prod"), env)
    assert prod.credentials() == {"api_key": "crl_prodkey"}
    assert prod.credentials(token="eyJ.a.b") == {"token": "eyJ.a.b"}
    assert prod.credentials(api_key="crl_mine") == {"api_key": "crl_mine"}


@pytest.mark.parametrize(("profile", "message"), [
    ('address = "h:1"\nadress = "typo:1"', "unknown key 'adress'"),
    ('address = "h:1"\napi_key = "crl_a"\ntoken = "t"', "one credential, not api_key and token"),
    ('address = "nohostport"', "must be host:port"),
    ('address = "h:1"\ntls = "yes"', "tls must be true or false"),
    ('address = "h:1"\napi_key_file = "missing.key"', "cannot read"),
    ('address = "h:1"\nca = "missing.pem"', "CA file"),
    ('address = ""', "address must be a non-empty string"),
])
def test_a_broken_profile_is_refused_naming_the_problem(
    tmp_path: Path, profile: str, message: str
) -> None:
    (tmp_path / "config.toml").write_text(f"[profiles.bad]\n{profile}\n")
    env = {"CORRAL_CONFIG": str(tmp_path / "config.toml")}
    with pytest.raises(ProfileError, match=message) as info:
        resolve(ConnectionOptions(profile="bad"), env)
    assert str(tmp_path / "config.toml") in str(info.value) or "CA file" in str(info.value)


def test_an_unknown_profile_lists_the_ones_there_are(env: dict[str, str]) -> None:
    with pytest.raises(ProfileError, match=r"no profile 'prd' .*\(profiles there: local, prod, "
                                           r"staging\)"):
        resolve(ConnectionOptions(profile="prd"), env)


def test_a_file_that_is_not_toml_or_names_a_missing_default_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    env = {"CORRAL_CONFIG": str(path)}
    path.write_text("[profiles.x\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        resolve(ConnectionOptions(), env)
    path.write_text('default = "gone"\n[profiles.x]\naddress = "h:1"\n')
    with pytest.raises(ProfileError, match="default names profile 'gone'"):
        resolve(ConnectionOptions(), env)


def test_the_command_reports_a_bad_profile_as_a_usage_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, ["--profile", "prd", "agents"], obj=State())
    assert result.exit_code == 2
    assert "no profile 'prd'" in result.output
    result = CliRunner().invoke(cli, ["agents"], obj=State(), env={"CORRAL_PROFILE": "nope"})
    assert result.exit_code == 2
    assert "no profile 'nope'" in result.output
