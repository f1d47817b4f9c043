"""The corral command's client without a platform: the CLI's unit tests run the command against
it and open no socket."""

from __future__ import annotations

from corral import names
from corral.bundle import digest_of
from corral.client import CorralClient, PublishProgress
from corral.config import ClientConfig
from corral.identity.v1 import identity_pb2
from corral.registry.v1 import keys_pb2 as ks
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro


class RecordingClient(CorralClient):
    """Answers the calls the CLI's tests make from memory and keeps what they were asked."""

    def __init__(self) -> None:
        super().__init__(ClientConfig(addrs={}))
        self.uploaded: list[bytes] = []
        self.asked: list[names.RolloutRef] = []
        self.promoted: list[tuple[names.RolloutRef, bool]] = []
        # What the keys commands sent: (tenant, key) created, (tenant, show_revoked) listed,
        # (name or id, tenant) revoked.
        self.keys_created: list[tuple[str, ks.Key]] = []
        self.keys_listed: list[tuple[str, bool]] = []
        self.keys_revoked: list[tuple[str, str]] = []

    def publish_bundle(self, data: bytes, progress: PublishProgress | None = None) -> reg.Version:
        self.uploaded.append(data)
        return reg.Version(name="agents/a/versions/1", number=1, digest=digest_of(data),
                           size_bytes=len(data))

    def get_endpoint(self, agent: str, endpoint: str) -> reg.Endpoint:
        # Every agent's DEFAULT serves the version publish_bundle answers.
        return reg.Endpoint(name=names.endpoint_name(agent, endpoint), traffic=[
            reg.TrafficTarget(version=f"agents/{agent}/versions/1", percent=100)])

    def get_rollout(self, rollout: names.RolloutRef) -> ro.Rollout:
        self.asked.append(rollout)
        # "-" stands for the newest, which here is rollout 7.
        return ro.Rollout(name=names.RolloutRef(rollout.endpoint, rollout.id or 7).name)

    def promote_rollout(self, rollout: names.RolloutRef, *, full: bool = False) -> ro.Rollout:
        self.promoted.append((rollout, full))
        return ro.Rollout(name=rollout.name)

    def create_key(self, key: ks.Key, tenant: str = "") -> ks.CreateKeyResponse:
        self.keys_created.append((tenant, key))
        made = ks.Key(name="keys/abcdefgh234567ab", key_id="abcdefgh234567ab",
                      tenant=tenant or "t", display_name=key.display_name or "key-abcdefgh234567ab",
                      role=key.role)
        made.create_time.GetCurrentTime()
        return ks.CreateKeyResponse(key=made, api_key=KEY)

    def list_keys(self, tenant: str = "", show_revoked: bool = False) -> list[ks.Key]:
        self.keys_listed.append((tenant, show_revoked))
        return [ks.Key(name="keys/abcdefgh234567ab", key_id="abcdefgh234567ab", tenant="t",
                       display_name="ci", role=ks.KEY_ROLE_OPERATOR)]

    def revoke_key(self, name_or_id: str, tenant: str = "") -> ks.Key:
        self.keys_revoked.append((name_or_id, tenant))
        revoked = ks.Key(name="keys/abcdefgh234567ab", key_id="abcdefgh234567ab",
                         tenant=tenant or "t", display_name=name_or_id)
        revoked.revoke_time.GetCurrentTime()
        return revoked

    def whoami(self) -> identity_pb2.WhoAmIResponse:
        return identity_pb2.WhoAmIResponse(
            tenant="t", subject="key:ci", roles=["operator"], credential_kind="api_key",
            credential="abcdefgh234567ab")


# The key create_key answers with.
KEY = "crl_abcdefgh234567ab_" + "s" * 52
