"""Cold start: the collector paused for bulk steps (any thread) and restored; what the
``run --once`` path leaves unloaded."""

from __future__ import annotations

import gc
import threading

from pyproxy import gcpolicy


def test_the_collector_stays_off_until_the_last_of_overlapping_steps_of_two_threads_ends() -> None:
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with gcpolicy.paused():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    with gcpolicy.paused():
        assert not gc.isenabled()
        t.start()
        assert inside.wait(5)
    # this thread's step ended, the worker's has not: still off
    assert not gc.isenabled()
    release.set()
    t.join(5)
    assert gc.isenabled()


def test_a_step_that_fails_restores_the_collector_and_one_already_off_stays_off() -> None:
    try:
        with gcpolicy.paused():
            raise KeyError("boom")
    except KeyError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with gcpolicy.paused(), gcpolicy.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # whoever turned it off turns it on
    finally:
        gc.enable()


def test_the_once_path_loads_no_api_client_and_no_http_server() -> None:
    """``run --once`` with a file imports the command line, the daemon's apply_once and the
    cleanup of other modes: aiohttp (~0.25 s, most of it its TLS contexts) and pyroute2 (0.2 s;
    only for interface addresses, which a Node object makes unneeded) stay unloaded."""
    import subprocess
    import sys

    code = ("import sys, pyproxy.cli, pyproxy.daemon, pyproxy.health, pyproxy.snapshot, pyproxy.hostnet, "
            "pyproxy.cleanup; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('aiohttp', 'kubernetes_asyncio', 'pyroute2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_settled_step_leaves_what_it_made_out_of_the_collectors_sight_a_plain_one_does_not() -> None:
    class Made:
        pass

    gc.unfreeze()
    try:
        with gcpolicy.paused(settle=True):
            kept = [Made() for _ in range(3)]
        assert gc.get_freeze_count() > 0 and not any(o is kept for o in gc.get_objects())
        gc.unfreeze()
        with gcpolicy.paused():
            other = [Made() for _ in range(3)]
        assert gc.get_freeze_count() == 0 and any(o is other for o in gc.get_objects())
        try:
            with gcpolicy.paused(settle=True):
                raise KeyError("a failed step settles nothing")
        except KeyError:
            pass
        assert gc.get_freeze_count() == 0 and gc.isenabled()
    finally:
        gc.unfreeze()
