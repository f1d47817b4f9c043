"""Corral services: registry, router, sessions, executor, telemetry, and their shared kit."""
