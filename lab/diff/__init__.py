"""Differential testing against upstream kube-proxy (issue 13).

A seed makes a random but valid cluster (:mod:`lab.diff.gen`); the cluster is created on a real
API server; upstream kube-proxy programs one world and pyproxy another, two copies of the same
one-node network with the same addresses (:mod:`lab.diff.world`); the same probes run from the
same vantage points in both (:mod:`lab.diff.probe`), and their outcomes are compared. A mismatch
is shrunk to a minimal cluster and written as YAML (:mod:`lab.diff.shrink`).
``python3 -m lab.diff --help`` runs it.
"""
