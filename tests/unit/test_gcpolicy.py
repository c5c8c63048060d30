"""pyproxy.gcpolicy: the collector paused for bulk steps, in any thread, and restored."""

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
