"""The sessions service: session records, version pins, state with etags, turns and leases."""
