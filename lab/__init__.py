"""The lab: network namespaces standing in for nodes, pods and an external client, and a real
cluster in them (``python3 -m lab up``). A development tool kept beside the product, not in it:
the netns tests, the e2e tests, the benchmarks and the demo use it; pyproxy's wheel and image do
not hold it, and an import-linter contract keeps the product from importing it.

Every address lives in namespaces the lab creates, so test traffic never leaves the machine.
"""
