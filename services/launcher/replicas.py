"""CORRAL_REPLICAS: how many processes of each service `make run` starts, e.g.
`router=2,registry=2,sessions=2,telemetry=2,executor=2`. Every replica of a service is reached
through one address setting that lists them all (services/common/addresses.py), so the others call
them in turn and do without one that died until the launcher has started it again. Executors are
a fleet instead: each registers itself and routers place sessions on them; each further executor
gets a data directory of its own (its name, bundles, sandboxes, keys)."""

from __future__ import annotations

from services.common.settings import SERVICES, SettingsError

VARIABLE = "CORRAL_REPLICAS"
MAX_REPLICAS = 8


def parse(value: str) -> dict[str, int]:
    """Replicas per service named in `value` (a service not named has one)."""
    counts: dict[str, int] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        service, sep, number = item.partition("=")
        service = service.strip()
        if not sep or service not in SERVICES:
            raise SettingsError(
                f"{VARIABLE}={value!r}: {item!r} is not SERVICE=N (services: {', '.join(SERVICES)})")
        try:
            count = int(number)
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_REPLICAS:
            raise SettingsError(
                f"{VARIABLE}={value!r}: {service}'s count must be a whole number from 1 to {MAX_REPLICAS}")
        counts[service] = count
    return counts


def names(service: str, count: int) -> list[str]:
    """The launcher's names of a service's processes: `router`, `router-2`, `router-3`, ..."""
    return [service, *(f"{service}-{n}" for n in range(2, count + 1))]
