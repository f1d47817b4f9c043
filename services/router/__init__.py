"""Router: resolves endpoint → version per session, forwards to an executor, streams back."""
