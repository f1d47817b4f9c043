"""The corral command's client without a platform: the CLI's unit tests run the command against
it and open no socket."""

from __future__ import annotations

from corral import names
from corral.bundle import digest_of
from corral.client import CorralClient
from corral.config import ClientConfig
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro


class RecordingClient(CorralClient):
    """Answers the calls the CLI's tests make from memory and keeps what they were asked."""

    def __init__(self) -> None:
        super().__init__(ClientConfig(addrs={}, tenant="t", user="u"))
        self.uploaded: list[bytes] = []
        self.asked: list[names.RolloutRef] = []
        self.promoted: list[tuple[names.RolloutRef, bool]] = []

    def publish_bundle(self, data: bytes) -> reg.Version:
        self.uploaded.append(data)
        return reg.Version(name="agents/a/versions/1", number=1, digest=digest_of(data),
                           size_bytes=len(data))

    def get_rollout(self, rollout: names.RolloutRef) -> ro.Rollout:
        self.asked.append(rollout)
        # "-" stands for the newest, which here is rollout 7.
        return ro.Rollout(name=names.RolloutRef(rollout.endpoint, rollout.id or 7).name)

    def promote_rollout(self, rollout: names.RolloutRef, *, full: bool = False) -> ro.Rollout:
        self.promoted.append((rollout, full))
        return ro.Rollout(name=rollout.name)
