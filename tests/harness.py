"""Shared test helpers: real databases, free ports, and in-process services on those ports."""

from __future__ import annotations

import importlib
import os
import socket
import uuid
from dataclasses import replace
from pathlib import Path

from services.common.server import ServiceHost
from services.common.settings import SERVICES, Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(database_url: str, redis_url: str, data_dir: Path, **env: str) -> Settings:
    """Settings for one test run: free ports for every service, a private Redis key prefix."""
    values = {
        "CORRAL_DATABASE_URL": database_url,
        "CORRAL_REDIS_URL": redis_url,
        "CORRAL_DATA_DIR": str(data_dir),
        "CORRAL_REDIS_PREFIX": f"corral-test-{uuid.uuid4().hex[:8]}:",
        "CORRAL_TRACING": "false",
    }
    for svc in SERVICES:
        values[f"CORRAL_{svc.upper()}_ADDR"] = f"127.0.0.1:{free_port()}"
    values.update(env)
    return Settings.from_env(values)


async def start_service(name: str, settings: Settings) -> ServiceHost:
    app = importlib.import_module(f"services.{name}.app")
    host = ServiceHost(name, settings, app.build(settings))
    await host.start()
    return host


def with_tracing(settings: Settings) -> Settings:
    return replace(settings, tracing=True)


def test_database_url() -> str | None:
    return os.environ.get("CORRAL_TEST_DATABASE_URL") or None


def test_redis_url() -> str | None:
    return os.environ.get("CORRAL_TEST_REDIS_URL") or None
