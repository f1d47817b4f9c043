"""Executor: one sandbox per session, the model broker, invocation spans."""
