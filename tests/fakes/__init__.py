"""Fakes for unit tests, one module per service (and `cli` for the corral command's client):
each stands in for one Protocol seam (a store, a clock, an id source, a clients module), so a
domain can be tested without a socket. What several services share is in `common`."""
