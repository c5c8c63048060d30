"""pyproxy.nft.netlink: element changes encoded as the kernel's nf_tables messages (pure parts;
tests/netns/test_netlink.py applies them to a real kernel and compares with nft -f)."""

from __future__ import annotations

import struct

import pytest

from pyproxy.nft import netlink as nl
from pyproxy.nft.transaction import Transaction
from pyproxy.render import nftables as r


@pytest.mark.parametrize("family", [4, 6])
def test_every_set_pyproxy_declares_has_a_codec(family):
    for name, spec in r.sets_for(family).items():
        c = nl.codec(spec)
        assert c.key and (c.data is None or c.data), name
    for protocol in ("tcp", "udp", "sctp"):
        emap = nl.codec(r.endpoint_map_spec(family, protocol))
        assert emap.interval and emap.data == ("ipv6_addr" if family == 6 else "ipv4_addr", "inet_service")
        first = nl.codec(r.first_map_spec(family, protocol))
        assert first.key == (nl.NUMBER,) and first.data == emap.data


def test_affinity_sets_and_unknown_types_are_left_to_nft():
    with pytest.raises(nl.Unsupported):
        nl.codec("type ipv4_addr . inet_service ; flags interval ;")
    with pytest.raises(nl.Unsupported):
        nl.codec("type ether_addr ;")
    with pytest.raises(nl.Unsupported):
        nl.codec("typeof ip saddr : verdict ;")


def _attrs(buf: bytes) -> list[tuple[int, bytes]]:
    """Top-level netlink attributes of ``buf`` as (type without flags, payload)."""
    out, off = [], 0
    while off + 4 <= len(buf):
        size, kind = struct.unpack_from("=HH", buf, off)
        out.append((kind & 0x3FFF, buf[off + 4:off + size]))
        off += size + (-size % 4)
    return out


def _key(element: bytes) -> bytes:
    (_, body), = _attrs(element)  # NFTA_LIST_ELEM
    fields = dict(_attrs(body))
    (_, value), = _attrs(fields[nl.NFTA_SET_ELEM_KEY])
    return value


def test_concatenated_keys_pad_every_field_to_a_register():
    c = nl.codec(r.sets_for(4)["service-ips"])
    tx = Transaction(set_specs=r.sets_for(4))
    tx.add_element("service-ips", "10.9.9.9 . tcp . 443", "goto service-x")
    (msg,) = nl.messages(tx)
    assert c.key == ("ipv4_addr", "inet_proto", "inet_service")
    assert _key(msg.elements[0]).hex() == "0a090909" "06000000" "01bb0000"
    fields = dict(_attrs(_attrs(msg.elements[0])[0][1]))
    (verdict_kind, verdict), = _attrs(fields[nl.NFTA_SET_ELEM_DATA])
    assert verdict_kind == nl.NFTA_DATA_VERDICT
    parts = dict(_attrs(verdict))
    assert struct.unpack("!i", parts[nl.NFTA_VERDICT_CODE])[0] == -4  # NFT_GOTO
    assert parts[nl.NFTA_VERDICT_CHAIN] == b"service-x\0"


def test_an_interval_is_a_start_with_data_and_a_flagged_end():
    spec = r.endpoint_map_spec(4, "tcp")
    tx = Transaction(set_specs={"endpoints-x": spec})
    tx.add_element("endpoints-x", "0-116396279", "10.1.0.7 . 8087")
    (msg,) = nl.messages(tx)
    start, end = msg.elements
    assert _key(start) == struct.pack("!I", 0) and _key(end) == struct.pack("!I", 116396280)
    start_fields = dict(_attrs(_attrs(start)[0][1]))
    (_, data), = _attrs(start_fields[nl.NFTA_SET_ELEM_DATA])
    assert data.hex() == "0a010007" "1f970000"
    end_fields = dict(_attrs(_attrs(end)[0][1]))
    assert struct.unpack("!I", end_fields[nl.NFTA_SET_ELEM_FLAGS])[0] == nl.NFT_SET_ELEM_INTERVAL_END
    assert nl.NFTA_SET_ELEM_DATA not in end_fields
    # A delete carries no data.
    tx = Transaction(set_specs={"endpoints-x": spec})
    tx.delete_element("endpoints-x", "0-116396279")
    (msg,) = nl.messages(tx)
    assert all(nl.NFTA_SET_ELEM_DATA not in dict(_attrs(_attrs(e)[0][1])) for e in msg.elements)


def test_a_first_endpoint_key_is_the_offset_in_host_byte_order():
    """numgen writes its register in host order and a hash lookup takes it as it is (an interval
    lookup gets it converted to big-endian first; nft --debug=netlink shows the byteorder step
    only before interval lookups)."""
    import sys

    spec = r.first_map_spec(4, "tcp")
    tx = Transaction(set_specs={"first-x": spec})
    tx.add_element("first-x", "24504480", "10.1.0.7 . 8087")
    (msg,) = nl.messages(tx)
    (element,) = msg.elements
    assert _key(element) == (24504480).to_bytes(4, sys.byteorder)
    (_, data), = _attrs(dict(_attrs(_attrs(element)[0][1]))[nl.NFTA_SET_ELEM_DATA])
    assert data.hex() == "0a010007" "1f970000"
    for bad in ("-1", "4294967296", "1-2"):
        tx = Transaction(set_specs={"first-x": spec})
        tx.add_element("first-x", bad, "10.1.0.7 . 8087")
        with pytest.raises(nl.Unsupported):
            nl.messages(tx)


def test_ipv6_and_plain_sets():
    specs = r.sets_for(6)
    tx = Transaction(family="ip6", set_specs=specs)
    tx.add_element("hairpin", "fd00::1 . fd00::1")
    tx.add_element("nodeport-ips", "fd00::a")
    tx.add_element("no-endpoint-services", "fd00::10 . udp . 53", "drop")
    hairpin, nodeport, noep = nl.messages(tx)
    assert _key(hairpin.elements[0]) == bytes.fromhex("fd00" + "0" * 27 + "1") * 2
    assert len(_key(nodeport.elements[0])) == 16
    data = dict(_attrs(_attrs(noep.elements[0])[0][1]))[nl.NFTA_SET_ELEM_DATA]
    (_, verdict), = _attrs(data)
    assert dict(_attrs(verdict)) == {nl.NFTA_VERDICT_CODE: struct.pack("!i", 0)}  # NF_DROP


def test_consecutive_operations_on_one_set_share_a_message_in_order():
    tx = Transaction(set_specs=r.sets_for(4))
    tx.delete_element("hairpin", "10.0.0.1 . 10.0.0.1")
    tx.add_element("hairpin", "10.0.0.2 . 10.0.0.2")
    tx.add_element("hairpin", "10.0.0.3 . 10.0.0.3")
    tx.add_element("nodeport-ips", "10.0.0.9")
    msgs = nl.messages(tx)
    assert [(m.verb, m.set_name, len(m.elements)) for m in msgs] == [
        ("delete", "hairpin", 1), ("add", "hairpin", 2), ("add", "nodeport-ips", 1)]


def test_a_big_change_is_split_below_the_attribute_limit():
    tx = Transaction(set_specs=r.sets_for(4))
    for i in range(5000):
        tx.add_element("hairpin", f"10.{i // 250}.{i % 250}.1 . 10.{i // 250}.{i % 250}.1")
    msgs = nl.messages(tx)
    assert len(msgs) > 1 and sum(len(m.elements) for m in msgs) == 5000
    assert all(sum(map(len, m.elements)) <= nl.MAX_ELEMENTS_BYTES for m in msgs)


def _greedy(sizes: list[int]) -> list[int]:
    """Elements per message when each message takes elements until the next would not fit."""
    counts, size = [0], 0
    for n in sizes:
        if counts[-1] and size + n > nl.MAX_ELEMENTS_BYTES:
            counts.append(0)
            size = 0
        counts[-1] += 1
        size += n
    return counts


@pytest.mark.parametrize("sized", ["fixed", "varied"])
def test_runs_of_fixed_and_varied_sizes_fill_each_message_in_order(sized):
    tx = Transaction(set_specs=r.sets_for(4))
    for i in range(10000):
        ip = f"10.{i // 250}.{i % 250}.1"
        if sized == "fixed":
            tx.add_element("hairpin", f"{ip} . {ip}")
        else:  # verdicts naming chains of different lengths
            tx.add_element("service-ips", f"{ip} . tcp . 80", f"goto service-{'x' * (i % 37)}")
    msgs = nl.messages(tx)
    each = [e for m in msgs for e in m.elements]
    assert each == [b"".join(nl.elements(op, nl.codec(tx.set_specs[op.name]))) for op in tx.ops]
    assert [len(m.elements) for m in msgs] == _greedy([len(e) for e in each])
    assert len(msgs) > 2 and (len({len(e) for e in each}) == 1) == (sized == "fixed")


@pytest.mark.parametrize("build", [
    lambda tx: tx.add_chain("service-x", rules=("goto x",)),
    lambda tx: tx.flush_chain("service-x"),
    lambda tx: tx.add_element("unknown-set", "10.0.0.1"),
    lambda tx: tx.add_element("service-ips", "10.0.0.1 . tcp", "goto x"),  # a field missing
    lambda tx: tx.add_element("service-ips", "10.0.0.1 . tcp . 80", "queue"),
    lambda tx: tx.add_element("nodeport-ips", "not-an-address"),
])
def test_what_it_cannot_encode_goes_to_nft(build):
    tx = Transaction(set_specs=r.sets_for(4))
    build(tx)
    with pytest.raises(nl.Unsupported):
        nl.messages(tx)


def test_the_nft_cli_uses_nft_for_anything_but_elements():
    """NftCli sends only element-only transactions over netlink; others never open a socket."""
    from pyproxy.nft.executor import NftCli

    cli = NftCli(binary="/nonexistent/nft-never-run")
    tx = Transaction(set_specs=r.sets_for(4))
    tx.add_chain("service-x")
    assert cli._encode(tx) is None and cli._sock is None


def _fake_nft(tmp_path, script: str):
    path = tmp_path / "nft"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def _cold_start_parts():
    chains, elements = (Transaction(set_specs=r.sets_for(4)) for _ in range(2))
    chains.add_chain("service-x")
    elements.add_element("service-ips", "10.9.9.9 . tcp . 443", "goto service-x")
    return chains, elements


def test_a_cold_start_sends_the_elements_only_after_nft_took_the_chains(tmp_path, monkeypatch):
    """run_in_order encodes the elements while nft runs, but sends them after nft is done:
    the element batch refers to chains only that script declares."""
    from pyproxy.nft.executor import NftCli

    marker = tmp_path / "nft-done"
    cli = NftCli(binary=_fake_nft(tmp_path, f"cat > /dev/null; sleep 0.3; touch {marker}\n"))
    sent = []
    monkeypatch.setattr(cli, "_send", lambda tx, batch: sent.append((marker.exists(), len(batch))) or True)
    cli.run_in_order(_cold_start_parts())
    assert sent == [(True, 1)] and cli.paths["nft"] == 1


def test_a_cold_start_whose_chains_are_refused_sends_no_element(tmp_path, monkeypatch):
    from pyproxy.nft.executor import NftCli, NftError

    cli = NftCli(binary=_fake_nft(tmp_path, "cat > /dev/null; echo 'Error: no such chain' >&2; exit 1\n"))
    sent = []
    monkeypatch.setattr(cli, "_send", lambda tx, batch: sent.append(batch) or True)
    with pytest.raises(NftError, match="no such chain"):
        cli.run_in_order(_cold_start_parts())
    assert sent == []


def test_nft_reads_its_whole_script(tmp_path):
    """The script reaches nft through a memory file (pyproxy.runcmd): all of it, byte for byte."""
    from pyproxy.nft.executor import NftCli

    copy = tmp_path / "script"
    cli = NftCli(binary=_fake_nft(tmp_path, f"cat > {copy}\n"), netlink=False)
    tx = Transaction(set_specs=r.sets_for(4))
    for k in range(20000):
        tx.add_element("service-ips", f"10.{k // 250 % 250}.{k % 250}.1 . tcp . {1 + k % 60000}", "goto service-x")
    cli.run(tx)
    assert copy.read_bytes() == tx.render_bytes() and len(tx.render_bytes()) > 500_000


def _general(op, c):
    try:
        return b"".join(nl.elements(op, c))
    except nl.Unsupported as err:
        return f"Unsupported: {err}"


def _fast(op, c):
    try:
        return nl.encoder(c, op.verb)(op)
    except nl.Unsupported as err:
        return f"Unsupported: {err}"


@pytest.mark.parametrize("family", [4, 6])
def test_the_fast_encoders_give_the_general_paths_bytes_or_its_error(family):
    """Every set pyproxy declares, both verbs, good values and odd ones: the closure a set gets
    (made for speed) encodes exactly what the general path encodes, or fails with its error."""
    from pyproxy.nft.transaction import Op

    good4 = ["10.0.0.1", "255.255.255.255", "0.0.0.0"]
    odd = ["10.1", "010.0.0.1", "0x0a.0.0.1", "10.0.0.256", "", "10.0.0.1 .", "1.2.3.4 . 5.6.7.8 . 9",
           "::1", "fd00::1", "a", "10.0.0.1 . 65536", "10.0.0.1 . -1", "10.0.0.1 . ²", "10.0.0.1 . 80"]
    endpoints = ["10.0.0.1 . 80", "10.0.0.1 . 0", "10.0.0.1 . 65535", "fd00::1 . 80"] + odd
    keys = good4 + ["fd00::1", "10.0.0.1 . 10.0.0.2", "10.0.0.1 . tcp . 80", "fd00::1 . udp . 53",
                    "10.0.0.1 . sctp . 65535", "10.0.0.1 . udp . 53", "10.0.0.1 . 6 . 80", "10.0.0.1 . TCP . 80", "10.0.0.1 .  tcp . 80",
                    "10.0.0.1 . tcp . 80 ", " 10.0.0.1 . tcp . 80", "10.0.0.1 . tcp . 0", "10.0.0.1 . tcp . 65536",
                    "10.0.0.1 . icmp . 80", "10.0.0.1 . tcp", "10.0.0.1 . tcp . 80 . 1", "10.1 . tcp . 80",
                    "0", "7", "4294967295", "4294967296", "-1", "0-1225223", "5-4", "0-4294967295",
                    "3-4294967294", "x-y"] + odd
    specs = dict(r.sets_for(family))
    for protocol in ("tcp", "udp", "sctp"):
        specs[f"emap-{protocol}"] = r.endpoint_map_spec(family, protocol)
        specs[f"first-{protocol}"] = r.first_map_spec(family, protocol)
    compared = 0
    for name, spec in specs.items():
        c = nl.codec(spec)
        for verb in ("add", "delete"):
            for key in keys:
                for value in (endpoints if verb == "add" and c.data not in (None, ("verdict",))
                              else ["goto service-X", "jump a/b", "drop", "goto", "bogus", "goto  x", "goto x ",
                                    " goto x", "jump x y", "goto \tx", "goto x\t", "return", "accept",
                                    "goto " + "c" * 60, "goto é/ü", "goto abc", "goto abcd", "goto abcde"]
                              if verb == "add" and c.data == ("verdict",) else [""]):
                    op = Op(verb, "element", name, key, value)
                    assert _fast(op, c) == _general(op, c), (name, verb, key, value)
                    compared += 1
    assert compared > 500


def test_parts_go_in_order_and_stop_at_one_that_cannot_run(tmp_path, monkeypatch):
    """Parts made ahead are applied one at a time, in order; a part that cannot run stops the
    rest (the ones before it stay applied: a cold start's table is rebuilt by the next sync)."""
    from pyproxy.nft.executor import NftCli, NftError

    log = tmp_path / "log"
    cli = NftCli(binary=_fake_nft(tmp_path, f"cat > /dev/null; sleep 0.1; echo nft >> {log}\n"))
    monkeypatch.setattr(cli, "_send", lambda tx, batch: bool(log.open("a").write(f"netlink {len(batch)}\n")))

    def parts(bad: bool):
        for k in range(3):
            chains, elements = _cold_start_parts()
            yield chains
            yield elements
            if bad and k == 1:
                broken = Transaction()
                broken.add_chain("no;good")
                yield broken
    cli.run_in_order(parts(bad=False))
    assert log.read_text().split("\n")[:-1] == ["nft", "netlink 1"] * 3
    log.unlink()
    with pytest.raises(NftError, match="transaction not run"):
        cli.run_in_order(parts(bad=True))
    assert log.read_text().split("\n")[:-1] == ["nft", "netlink 1"] * 2
