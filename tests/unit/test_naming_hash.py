"""Chain names stay what they were: the hash prefix is encoded from only the digest bytes it
needs, which must give exactly the characters the whole digest's encoding begins with."""

from __future__ import annotations

import base64
import hashlib
import random

from pyproxy.model.objects import Endpoint, ServicePortName
from pyproxy.render.naming import _hash, ipt_endpoint_hash, ipt_service_hash, nft_service_base


def test_the_short_encoding_is_the_prefix_of_the_whole_digests_for_every_length() -> None:
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789/-.:") for _ in range(rng.randint(0, 80)))
        whole = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()
        for length in range(1, 53):
            assert _hash(text, length) == whole[:length], (text, length)


def test_names_of_a_known_service_port_are_unchanged() -> None:
    # Names a running node already holds: a change would rename every chain on upgrade.
    spn = ServicePortName("default", "web", "http", "tcp")
    assert nft_service_base(spn) == "SUSTUHLJ-default/web/tcp/http"
    assert ipt_service_hash(spn) == "CDGGSHYLG3RE2FKL"
    assert len(ipt_endpoint_hash(spn, Endpoint(ip="10.244.1.5", port=8080))) == 16


def test_the_c_sort_key_orders_service_port_names_as_their_own_comparison_does() -> None:
    from pyproxy.model.objects import NAME_ORDER

    rng = random.Random(3)
    names = [ServicePortName(rng.choice(["a", "b", "ns"]), rng.choice(["web", "db", "w"]),
                             rng.choice(["", "http", "dns"]), rng.choice(["tcp", "udp", "sctp"])) for _ in range(400)]
    assert sorted(names, key=NAME_ORDER) == sorted(names)
