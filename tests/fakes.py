"""Fakes for unit tests, in one place: each stands in for one Protocol seam of a service (its
store, clock, id source, or a clients module) so a domain can be tested without a socket."""

from __future__ import annotations

# -- sessions ----------------------------------------------------------------------------------


# -- router ------------------------------------------------------------------------------------


# -- registry ----------------------------------------------------------------------------------


# -- executor ----------------------------------------------------------------------------------


# -- telemetry ---------------------------------------------------------------------------------
