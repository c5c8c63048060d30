"""A lab of network namespaces standing in for nodes, pods and an external client.

Used by the netns tests, the benchmark and the demo. Every address lives in namespaces the lab
creates, so test traffic never leaves the machine.
"""
