"""Proxiers: keep a model of what is in the kernel and send it diffs."""
