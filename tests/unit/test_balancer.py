"""The userspace mode's backend choice: round-robin, affinity with a timeout, retry order."""

from __future__ import annotations

from collections import Counter

from pyproxy.userspace.balancer import Balancer

A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_spreads_exactly_evenly():
    bal = Balancer()
    bal.update((A, B, C), 0)
    firsts = Counter(bal.candidates("1.1.1.1")[0] for _ in range(300))
    assert firsts == {A: 100, B: 100, C: 100}


def test_candidates_list_every_backend_for_retries():
    bal = Balancer()
    bal.update((A, B, C), 0)
    order = bal.candidates("1.1.1.1")
    assert sorted(order) == [A, B, C] and len(order) == 3


def test_no_endpoints_no_candidates():
    assert Balancer().candidates("1.1.1.1") == []


def test_affinity_pins_until_timeout():
    clock = Clock()
    bal = Balancer(clock=clock)
    bal.update((A, B, C), 10)
    first = bal.candidates("1.1.1.1")[0]
    bal.used("1.1.1.1", first)
    for _ in range(20):
        clock.now += 1  # each use refreshes the pin
        pick = bal.candidates("1.1.1.1")[0]
        assert pick == first
        bal.used("1.1.1.1", pick)
    clock.now += 11  # idle past the timeout: back to round-robin
    picks = {bal.candidates("1.1.1.1")[0] for _ in range(3)}
    assert picks == {A, B, C}


def test_affinity_is_per_client_and_forgets_gone_backends():
    clock = Clock()
    bal = Balancer(clock=clock)
    bal.update((A, B), 60)
    bal.used("1.1.1.1", B)
    assert bal.candidates("1.1.1.1")[0] == B
    assert bal.candidates("2.2.2.2")[0] in (A, B)
    bal.update((A, C), 60)  # B is gone
    assert B not in bal.candidates("1.1.1.1")


def test_pinned_clients_do_not_skew_round_robin_for_new_ones():
    clock = Clock()
    bal = Balancer(clock=clock)
    bal.update((A, B, C), 60)
    firsts = []
    for client in ("1.1.1.1", "2.2.2.2", "3.3.3.3"):
        for _ in range(5):  # each client comes back several times
            pick = bal.candidates(client)[0]
            bal.used(client, pick)
        firsts.append(bal.candidates(client)[0])
    assert sorted(firsts) == [A, B, C]


def test_expired_pins_are_dropped_as_clients_come_and_go():
    """Hardening issue, defect 8: pins were never expired (100,000 clients kept 100,000 pins)."""
    now = [0.0]
    b = Balancer(clock=lambda: now[0])
    b.update((("10.0.0.1", 80), ("10.0.0.2", 80)), 10)
    for i in range(100_000):
        now[0] = i * 0.001  # 1,000 new clients a second, each seen once
        client = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        b.used(client, b.candidates(client)[0])
    # Only clients of the last 10 s can still be pinned (and at most twice that before a prune).
    assert len(b._pins) <= 2 * 10_000 + 1024
