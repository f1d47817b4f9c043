"""Corral: a self-hosted runtime for AI agents."""
