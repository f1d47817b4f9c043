"""Build-time generators run by make (protos, the Envoy configs)."""
