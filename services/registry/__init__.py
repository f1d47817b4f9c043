"""Registry: agents, immutable versions, endpoints and their traffic, the audit log."""
