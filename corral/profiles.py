"""Named connection profiles for the corral command: where a platform is (one address, usually its
Envoy edge), the credential to call it with, and whether to use TLS with which CA.

They live in a TOML file, ~/.config/corral/config.toml ($XDG_CONFIG_HOME honoured, CORRAL_CONFIG
overrides the path):

    default = "prod"                      # the profile used when none is named (optional)

    [profiles.prod]
    address = "corral.example.com:443"    # every service through the edge
    api_key_file = "~/.config/corral/prod.key"   # or api_key, token, token_file
    ca = "~/.config/corral/prod-ca.pem"   # verify the edge with this CA (default: system roots)
    tls = true                            # default: true when ca is set, else false

`--profile NAME` (or CORRAL_PROFILE) picks one; `--address`, `--ca` and `--tls/--no-tls` override
what it says. Relative paths are relative to the file's own folder."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from corral.config import DEFAULT_ADDRS, ClientConfig

# Keys a profile may have; anything else is a typo worth reporting.
_CREDENTIALS = ("api_key", "api_key_file", "token", "token_file")
_KEYS = frozenset({"address", "ca", "tls", *_CREDENTIALS})


class ProfileError(ValueError):
    """The config file or a profile in it cannot be used; the message names the file, the
    profile and the key."""


@dataclass(frozen=True)
class Profile:
    """Where and how to call a platform. Empty fields leave the defaults (the environment's
    CORRAL_<SVC>_ADDR, no TLS, the credential from --api-key / CORRAL_API_KEY / ...)."""

    name: str = ""
    address: str = ""
    api_key: str = ""
    token: str = ""
    ca: Path | None = None
    tls: bool = False

    def credentials(self, api_key: str | None = None, token: str | None = None) -> dict[str, str]:
        """ClientConfig.from_env's credential overrides: a credential given explicitly (flags,
        CORRAL_API_KEY, CORRAL_TOKEN) wins over the profile's."""
        if api_key or token:
            return {k: v for k, v in (("api_key", api_key), ("token", token)) if v}
        return {k: v for k, v in (("api_key", self.api_key), ("token", self.token)) if v}


@dataclass(frozen=True)
class ConnectionOptions:
    """The corral command's root options about the connection (None: not given)."""

    profile: str | None = None
    address: str | None = None
    ca: Path | None = None
    tls: bool | None = None


def config_path(env: Mapping[str, str]) -> Path:
    if env.get("CORRAL_CONFIG"):
        return Path(env["CORRAL_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or "~").expanduser() / ".config")
    return Path(base) / "corral" / "config.toml"


def _read_secret(path: Path, where: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise ProfileError(f"{where}: {path} is empty")
    return value


def parse_profile(name: str, table: Mapping[str, object], base: Path, source: Path) -> Profile:
    """One [profiles.NAME] table; `base` is the folder relative paths start from."""
    where = f"{source}: profile {name!r}"
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    for key, value in table.items():
        if key == "tls" and not isinstance(value, bool):
            raise ProfileError(f"{where}: tls must be true or false")
        if key != "tls" and (not isinstance(value, str) or not value.strip()):
            raise ProfileError(f"{where}: {key} must be a non-empty string")
    given = [k for k in _CREDENTIALS if k in table]
    if len(given) > 1:
        raise ProfileError(f"{where}: give one credential, not {' and '.join(given)}")

    def path(key: str) -> Path:
        return base / Path(str(table[key])).expanduser()

    address = str(table.get("address", "")).strip()
    if address and ":" not in address:
        raise ProfileError(f"{where}: address {address!r} must be host:port")
    secrets = {kind: str(table[kind]).strip() if kind in table else
               _read_secret(path(f"{kind}_file"), where) if f"{kind}_file" in table else ""
               for kind in ("api_key", "token")}
    ca = path("ca") if "ca" in table else None
    tls = table.get("tls", ca is not None)
    return Profile(name, address, secrets["api_key"], secrets["token"], ca, bool(tls))


def load(path: Path) -> tuple[dict[str, Profile], str]:
    """The profiles of a config file and the name of its default ("" when none); no file, none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    tables = doc.get("profiles", {})
    default = doc.get("default", "")
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ProfileError(f"{path}: profiles must be [profiles.NAME] tables")
    if not isinstance(default, str):
        raise ProfileError(f"{path}: default must be a profile's name")
    base = path.parent
    profiles = {name: parse_profile(name, t, base, path) for name, t in tables.items()}
    if default and default not in profiles:
        raise ProfileError(f"{path}: default names profile {default!r}, which it does not define")
    return profiles, default


def resolve(options: ConnectionOptions, env: Mapping[str, str]) -> Profile:
    """The profile the options name (or the file's default), with the options applied on top."""
    path = config_path(env)
    profiles, default = load(path)
    name = options.profile or default
    if name and name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ProfileError(f"no profile {name!r} in {path} (profiles there: {known})")
    profile = profiles[name] if name else Profile()
    if options.address is not None:
        if ":" not in options.address:
            raise ProfileError(f"--address {options.address!r} must be host:port")
        profile = replace(profile, address=options.address)
    if options.ca is not None:
        profile = replace(profile, ca=options.ca, tls=True)
    if options.tls is not None:
        profile = replace(profile, tls=options.tls)
    if profile.ca is not None and not profile.ca.is_file():
        raise ProfileError(f"CA file {profile.ca} (profile {profile.name or '-'}) does not exist")
    return profile


def client_config(options: ConnectionOptions, env: Mapping[str, str] | None = None,
                  *, api_key: str | None = None, token: str | None = None) -> ClientConfig:
    """The client's configuration: the environment, under the chosen profile, under the options.

    A profile's address replaces every CORRAL_<SVC>_ADDR before the environment is read, so
    nothing meant for a platform on this machine (its admin key) goes to a remote one."""
    env = os.environ if env is None else env
    profile = resolve(options, env)
    api_key = api_key or env.get("CORRAL_API_KEY")
    token = token or env.get("CORRAL_TOKEN")
    if profile.address:
        env = {**env, **{f"CORRAL_{svc.upper()}_ADDR": profile.address for svc in DEFAULT_ADDRS}}
    config = ClientConfig.from_env(env, **profile.credentials(api_key, token))
    return replace(config, tls=profile.tls, ca_file=profile.ca)
