"""Helpers for tests of the executor fleet: heartbeats as an executor sends them."""

from __future__ import annotations

from datetime import UTC, datetime

from corral.sessions.v1 import fleet_pb2


def beat(
    name: str, *, address: str = "127.0.0.1:1", capacity: int = 8, in_use: int = 0,
    warm: tuple[str, ...] = (),
) -> fleet_pb2.HeartbeatRequest:
    executor = fleet_pb2.Executor(
        name=f"executors/{name}", address=address, instance_id="i-" + name, driver="process",
        capacity=capacity, sandboxes_in_use=in_use, warm_versions=list(warm),
    )
    executor.start_time.FromDatetime(datetime.now(UTC))
    return fleet_pb2.HeartbeatRequest(executor=executor)
