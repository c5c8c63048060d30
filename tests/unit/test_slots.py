"""pyproxy.render.slots: where each endpoint pool's slots live in the shared maps."""

from __future__ import annotations

from pyproxy.model.objects import ServicePortName
from pyproxy.render.slots import MAP_ELEMENTS, MAP_POOLS, SLOTS, Region, SlotAllocator, map_name


def _key(i: int, proto: str = "tcp", local: bool = False):
    return ServicePortName("ns", f"svc{i}", "http", proto), local


def test_regions_fill_a_map_then_open_the_next():
    alloc = SlotAllocator()
    regions = [alloc.place(_key(i), 1) for i in range(MAP_POOLS + 1)]
    assert regions[0] == Region("tcp", 0, 0) and regions[MAP_POOLS - 1] == Region("tcp", 0, MAP_POOLS - 1)
    assert regions[MAP_POOLS] == Region("tcp", 1, 0)
    assert alloc.maps() == {"tcp": 2}
    # Every region of a map fits the 32-bit slot space.
    assert (MAP_POOLS * SLOTS) < 2 ** 32


def test_a_map_takes_no_pool_past_its_endpoint_budget_but_a_big_pool_gets_one_alone():
    alloc = SlotAllocator()
    assert alloc.place(_key(0), MAP_ELEMENTS - 10).map == 0
    assert alloc.place(_key(1), 5).map == 0       # still fits
    assert alloc.place(_key(2), 20).map == 1      # would overflow map 0, which closes
    assert alloc.place(_key(3), 1000).map == 2    # more than a map's budget: a map of its own
    # A pool going reopens its map.
    alloc.release(_key(1))
    assert alloc.place(_key(4), 5) == Region("tcp", 0, 1)


def test_maps_stay_few_at_scale():
    for size, maps in ((1, 157), (10, 400), (50, 2000)):
        alloc = SlotAllocator()
        for i in range(10_000):
            alloc.place(_key(i), size)
        assert alloc.maps() == {"tcp": maps}


def test_a_pool_keeps_its_region_as_it_grows_and_a_freed_region_is_reused_lowest_first():
    alloc = SlotAllocator()
    a, b, c = (alloc.place(_key(i), 2) for i in range(3))
    assert alloc.place(_key(1), 9) == b           # grown: same region, so its rule stays
    alloc.release(_key(0))
    alloc.release(_key(2))
    assert alloc.place(_key(7), 1) == a and alloc.place(_key(8), 1) == c
    assert alloc.region(_key(0)) is None


def test_each_protocol_and_each_pool_of_a_port_has_its_own_region():
    alloc = SlotAllocator()
    tcp, udp = alloc.place(_key(0), 1), alloc.place(_key(0, "udp"), 1)
    local = alloc.place(_key(0, local=True), 1)
    assert (tcp.map_name, udp.map_name) == (map_name("tcp", 0), map_name("udp", 0)) == ("endpoints-tcp-0", "endpoints-udp-0")
    assert local != tcp and local.map == 0 and alloc.maps() == {"tcp": 1, "udp": 1}
    assert tcp.offset == 0 and local.offset == SLOTS


def test_the_same_calls_give_the_same_layout():
    def layout():
        alloc = SlotAllocator()
        out = [alloc.place(_key(i), 1 + i % 7) for i in range(300)]
        for i in range(0, 300, 3):
            alloc.release(_key(i))
        return out + [alloc.place(_key(1000 + i), 3) for i in range(50)]
    assert layout() == layout()
