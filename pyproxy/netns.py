"""Run one call inside a named network namespace (``ip netns`` name), without leaving ours.

``setns`` changes the calling thread only, so a short-lived thread enters the namespace, makes
the call there and ends: a socket made there belongs to that namespace for good, and
``/proc/sys/net`` read there shows that namespace's values. The daemon itself runs in the
node's namespace and never needs this; tests and benchmarks that program a lab's namespace do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x4000_0000

T = TypeVar("T")


def call_in(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in the namespace ``netns`` (None: here, in this thread); its result, or its
    exception re-raised here (OSError when the namespace cannot be entered)."""
    if netns is None:
        return fn()
    import ctypes

    out: list[T] = []
    failed: list[BaseException] = []

    def enter_and_call() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{netns}", "rb") as fh:
                if libc.setns(fh.fileno(), CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns {netns}: {os.strerror(code)}")
            out.append(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            failed.append(err)

    worker = threading.Thread(target=enter_and_call, name=f"netns-{netns}")
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return out[0]
