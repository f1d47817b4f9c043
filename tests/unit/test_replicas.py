"""Address settings that list replicas, and CORRAL_REPLICAS."""

from __future__ import annotations

import pytest

from services.common import addresses
from services.common.settings import Settings, SettingsError
from services.launcher import replicas


def test_one_address_keeps_grpcs_defaults() -> None:
    assert addresses.grpc_target("registry.corral.svc:50062", "registry") == ("registry.corral.svc:50062", [])


def test_a_list_is_called_round_robin_and_checks_the_services_certificate() -> None:
    target, options = addresses.grpc_target("127.0.0.1:1, 127.0.0.1:2", "sessions")
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert dict(options) == {"grpc.lb_policy_name": "round_robin", "grpc.ssl_target_name_override": "sessions"}
    assert addresses.grpc_target("[::1]:1,[::1]:2", "sessions")[0] == "ipv6:[::1]:1,[::1]:2"


@pytest.mark.parametrize(("address", "says"), [
    ("a.example:1,b.example:2", "not ip:port"),
    ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
    ("127.0.0.1:1,127.0.0.1", "must be host:port"),
    (" , ", "is empty"),
])
def test_lists_that_cannot_be_used_are_refused(address: str, says: str) -> None:
    with pytest.raises(addresses.AddressError, match=says):
        addresses.check(address, "CORRAL_ROUTER_ADDR")


def test_settings_with_a_list_need_each_replicas_own_listen_address() -> None:
    env = {"CORRAL_SESSIONS_ADDR": "127.0.0.1:7001,127.0.0.1:7002"}
    with pytest.raises(SettingsError, match="set CORRAL_SESSIONS_LISTEN to this replica's own"):
        Settings.from_env(env)
    settings = Settings.from_env({**env, "CORRAL_SESSIONS_LISTEN": "127.0.0.1:7002",
                                  "CORRAL_SESSIONS_INTERNAL_LISTEN": "127.0.0.1:7012"})
    assert settings.internal_addrs["sessions"] == "127.0.0.1:7011,127.0.0.1:7012"
    assert settings.listen["sessions"] == "127.0.0.1:7002"


def test_corral_replicas() -> None:
    assert replicas.parse("router=2, sessions=3,executor=2") == {"router": 2, "sessions": 3, "executor": 2}
    assert replicas.parse("") == {}
    assert replicas.names("router", 3) == ["router", "router-2", "router-3"]
    for bad, says in (("router", "SERVICE=N"), ("gateway=2", "SERVICE=N"), ("router=0", "from 1 to 8"),
                      ("router=x", "from 1 to 8")):
        with pytest.raises(SettingsError, match=says):
            replicas.parse(bad)
