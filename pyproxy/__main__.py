"""``python -m pyproxy`` is the same as the ``pyproxy`` command."""

from pyproxy.cli import main

raise SystemExit(main())
