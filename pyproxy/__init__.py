"""pyproxy: a readable replacement for kube-proxy.

Layers, from the bottom up (enforced by the import-linter contract in pyproject.toml):

* ``pyproxy.model`` and ``pyproxy.config``: parse and validate API objects into an immutable
  desired state. Pure.
* ``pyproxy.render``: pure functions from the desired state to rule fragments (nft rule text,
  iptables-restore rule text).
* ``pyproxy.nft``, ``pyproxy.ipt``: transactions (pure) and the executors, the only code that runs
  ``nft`` and ``iptables-restore``; ``pyproxy.sources`` and ``pyproxy.hostnet`` read the world.
* ``pyproxy.proxier``: keeps a model of what is in the kernel and sends diffs.
* ``pyproxy.cli``: the command line.
"""

__version__ = "0.1.0"
