"""The endpoint parser takes the usual values inline (a cold start parses 100k endpoints) and
everything else through the general checks: over good and odd items of both families it must
give what the general checks alone give, the same Endpoint or the same error."""

from __future__ import annotations

import itertools
from typing import Any

from pyproxy.model.ipaddr import BadAddress, canonical_ip
from pyproxy.model.objects import Endpoint
from pyproxy.model.parse import Invalid, _bool, _endpoint, _endpoint_name, _hints, _mapping, \
    _node_name_problem, _zone_problem


def _general(item: Any, i: int, *, family: int, port: int, seen: set[str]) -> Endpoint:
    """The endpoint parser as it was before the inline paths: every value through the checks."""
    if not isinstance(item, dict):
        _mapping(item, f"endpoints[{i}]")
    addresses = item.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise Invalid(f"endpoints[{i}].addresses must be a non-empty list")
    try:
        ip, fam = canonical_ip(addresses[0])
    except BadAddress as err:
        raise Invalid(f"endpoints[{i}].addresses[0]: {err}") from None
    if fam != family:
        raise Invalid(f"endpoints[{i}]: {ip} is not IPv{family} but addressType is")
    if ip in seen:
        raise Invalid(f"endpoints[{i}]: duplicate endpoint {ip}")
    seen.add(ip)
    cond = item.get("conditions") or {}
    if not isinstance(cond, dict):
        _mapping(cond, f"endpoints[{i}].conditions")
    node_name, zone = item.get("nodeName"), item.get("zone")
    zone_hints, node_hints = _hints(item, i) if item.get("hints") else ((), ())
    return Endpoint(
        ip=ip, port=port,
        ready=_bool(cond.get("ready"), f"endpoints[{i}].conditions.ready", default=True),
        serving=_bool(cond.get("serving"), f"endpoints[{i}].conditions.serving", default=True),
        terminating=_bool(cond.get("terminating"), f"endpoints[{i}].conditions.terminating", default=False),
        node_name=_endpoint_name(node_name, i, "nodeName", _node_name_problem) if node_name else None,
        zone=_endpoint_name(zone, i, "zone", _zone_problem) if zone else None,
        zone_hints=zone_hints, node_hints=node_hints)


def _outcome(parse: Any, item: Any, family: int, seen: set[str]) -> object:
    try:
        return parse(item, 3, family=family, port=8080, seen=seen)
    except Invalid as err:
        return f"Invalid: {err}"


ADDRESSES: list[Any] = ["10.244.1.5", "10.244.1.05", "010.0.0.1", " 10.0.0.1", "10.0.0.1 ", "256.1.1.1", "1.2.3",
                        "fd00::1", "FD00:0::1", "::ffff:10.0.0.1", "x", "", 5, None, "10.0.0.1\n", "١٠.0.0.1"]
CONDITIONS: list[Any] = [None, {}, "x", {"ready": True}, {"ready": False, "serving": True, "terminating": True},
                         {"ready": None}, {"ready": "yes"}, {"ready": 1}, {"serving": 1}, {"serving": 0.0}, {"terminating": 0}, {"ready": [],
                         "serving": False}]


def test_inline_and_general_paths_agree_on_good_and_odd_items_of_both_families() -> None:
    compared = 0
    for family, address, cond in itertools.product((4, 6), ADDRESSES, CONDITIONS):
        for extra in ({}, {"nodeName": "node-1", "zone": "z1"}, {"nodeName": 7}):
            item: dict[str, Any] = {"addresses": [address], **extra}
            if cond is not None:
                item["conditions"] = cond
            seen_a, seen_b = {"10.244.1.6"}, {"10.244.1.6"}
            assert _outcome(_endpoint, item, family, seen_a) == _outcome(_general, item, family, seen_b), item
            assert seen_a == seen_b
            compared += 1
    # a duplicate, found after canonicalisation on both paths
    for address in ("10.244.1.6", "10.244.1.06"):
        item = {"addresses": [address]}
        assert _outcome(_endpoint, item, 4, {"10.244.1.6"}) == _outcome(_general, item, 4, {"10.244.1.6"})
    assert compared == 2 * len(ADDRESSES) * len(CONDITIONS) * 3
