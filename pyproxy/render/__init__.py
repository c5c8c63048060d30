"""Renderers: pure functions from the desired state to rule fragments (no I/O)."""
