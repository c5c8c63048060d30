"""``python3 -m lab up|down|status``: the lab cluster (see lab/cluster.py)."""

from lab.cluster import main

raise SystemExit(main())
