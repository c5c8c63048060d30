"""pyproxy.nft.transaction.Transaction rendering and validation, and FakeNft's semantics."""

from __future__ import annotations

import pytest

from pyproxy.nft import transaction as txmod
from pyproxy.nft.executor import FakeNft, NftCli, NftError
from pyproxy.nft.transaction import ELEMENT_CHUNK, Op, Transaction

W = "ip pyproxy"


def _one(build) -> str:
    tx = Transaction()
    build(tx)
    assert tx.error is None
    return tx.render()


@pytest.mark.parametrize(
    ("build", "want"),
    [
        (lambda t: t.add_table(), f"add table {W}"),
        (lambda t: t.add_table("rules for pyproxy"), f'add table {W} {{ comment "rules for pyproxy" ; }}'),
        (lambda t: t.delete_table(), f"delete table {W}"),
        (lambda t: t.add_chain("services"), f"add chain {W} services"),
        (lambda t: t.add_chain("nat-prerouting", "type nat hook prerouting priority -100 ;"),
         f"add chain {W} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"),
        (lambda t: t.flush_chain("services"), f"flush chain {W} services"),
        (lambda t: t.delete_chain("services"), f"delete chain {W} services"),
        (lambda t: t.add_rule("services", "ip daddr 1.2.3.4 drop"), f"add rule {W} services ip daddr 1.2.3.4 drop"),
        (lambda t: t.add_set("cluster-ips", "type ipv4_addr ;"), f"add set {W} cluster-ips {{ type ipv4_addr ; }}"),
        (lambda t: t.add_set("service-ips", "type ipv4_addr . inet_proto . inet_service : verdict ;"),
         f"add map {W} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"),
        (lambda t: t.delete_set("cluster-ips", "type ipv4_addr ;"), f"delete set {W} cluster-ips"),
        (lambda t: t.delete_set("service-ips", "type ipv4_addr : verdict ;"), f"delete map {W} service-ips"),
        (lambda t: t.add_element("cluster-ips", "10.0.0.1"), f"add element {W} cluster-ips {{ 10.0.0.1 }}"),
        (lambda t: t.add_element("service-ips", "10.0.0.1 . tcp . 80", "goto service-x"),
         f"add element {W} service-ips {{ 10.0.0.1 . tcp . 80 : goto service-x }}"),
        (lambda t: t.delete_element("service-ips", "10.0.0.1 . tcp . 80"),
         f"delete element {W} service-ips {{ 10.0.0.1 . tcp . 80 }}"),
    ],
)
def test_render_each_op(build, want):
    assert _one(build) == want + "\n"


def test_affinity_set_with_flags_is_a_set_not_a_map():
    tx = Transaction()
    tx.add_set("affinity-x", "type ipv4_addr ; flags dynamic,timeout ; timeout 60s ;")
    assert tx.ops == [Op("add", "set", "affinity-x", "type ipv4_addr ; flags dynamic,timeout ; timeout 60s ;")]


def test_other_family_and_table():
    tx = Transaction(family="ip6", table="other")
    tx.add_chain("c")
    assert tx.render() == "add chain ip6 other c\n"


def test_empty_transaction_renders_nothing():
    tx = Transaction()
    assert tx.render() == "" and len(tx) == 0


def test_ops_keep_their_order():
    tx = Transaction()
    tx.add_table()
    tx.add_chain("a")
    tx.add_rule("a", "accept")
    tx.flush_chain("a")
    tx.delete_chain("a")
    assert tx.render().splitlines() == [
        f"add table {W}", f"add chain {W} a", f"add rule {W} a accept",
        f"flush chain {W} a", f"delete chain {W} a"]
    assert len(tx) == 5


# -- declarations (nft does not fetch the table for them) -------------------------------------

SPECS = {
    "cluster-ips": 'type ipv4_addr ; comment "active ClusterIPs" ;',
    "service-ips": "type ipv4_addr . inet_proto . inet_service : verdict ;",
}


def test_chain_with_rules_renders_as_one_declaration():
    tx = Transaction()
    tx.add_chain("svc", rules=("ip daddr 1.2.3.4 jump mark", "goto ep"))
    assert tx.ops == [Op("add", "chain", "svc", "", rules=("ip daddr 1.2.3.4 jump mark", "goto ep"))]
    assert tx.render() == f"add chain {W} svc {{ ip daddr 1.2.3.4 jump mark ; goto ep ; }}\n"


def test_chain_with_spec_and_rules():
    tx = Transaction()
    tx.add_chain("hook", "type nat hook prerouting priority -100 ;", rules=("jump services",))
    assert tx.render() == (f"add chain {W} hook {{ type nat hook prerouting priority -100 ; "
                           "jump services ; }\n")


def test_rewrite_is_flush_then_declaration():
    tx = Transaction()
    tx.flush_chain("svc")
    tx.add_chain("svc", rules=("accept",))
    assert tx.render().splitlines() == [f"flush chain {W} svc", f"add chain {W} svc {{ accept ; }}"]
    assert not tx.has_deletes


@pytest.mark.parametrize("rules", [("",), ("  ",), ("accept ; flush ruleset",), ("accept\ndrop",),
                                   ("accept", "drop\r")])
def test_invalid_rule_inside_a_chain_declaration_is_refused(rules):
    tx = Transaction()
    tx.add_chain("svc", rules=rules)
    assert tx.error is not None and tx.error.startswith("invalid rule for chain 'svc'")
    assert len(tx) == 0


def test_element_additions_to_a_known_set_render_as_a_set_declaration():
    tx = Transaction(set_specs=SPECS)
    tx.add_element("cluster-ips", "10.0.0.1")
    tx.add_element("cluster-ips", "10.0.0.2")
    tx.add_element("service-ips", "10.0.0.1 . tcp . 80", "goto a")
    assert tx.render().splitlines() == [
        f'add set {W} cluster-ips {{ type ipv4_addr ; comment "active ClusterIPs" ; '
        "elements = { 10.0.0.1, 10.0.0.2 } ; }",
        f"add map {W} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; "
        "elements = { 10.0.0.1 . tcp . 80 : goto a } ; }",
    ]


def test_element_deletions_and_unknown_sets_keep_the_element_form():
    tx = Transaction(set_specs=SPECS)
    tx.delete_element("service-ips", "10.0.0.9 . tcp . 80")
    tx.add_element("other", "1.1.1.1")
    assert tx.render().splitlines() == [
        f"delete element {W} service-ips {{ 10.0.0.9 . tcp . 80 }}",
        f"add element {W} other {{ 1.1.1.1 }}",
    ]


def test_set_declarations_are_chunked_too(monkeypatch):
    monkeypatch.setattr(txmod, "ELEMENT_CHUNK", 2)
    tx = Transaction(set_specs=SPECS)
    for i in range(3):
        tx.add_element("cluster-ips", f"10.0.0.{i}")
    lines = tx.render().splitlines()
    assert [line.split("elements = { ")[1] for line in lines] == ["10.0.0.0, 10.0.0.1 } ; }", "10.0.0.2 } ; }"]
    assert all(line.startswith(f"add set {W} cluster-ips {{ type ipv4_addr ;") for line in lines)


@pytest.mark.parametrize(
    ("build", "deletes"),
    [
        (lambda t: (t.add_chain("a", rules=("accept",)), t.flush_chain("a")), False),
        (lambda t: t.add_element("cluster-ips", "1.1.1.1"), False),
        (lambda t: t.delete_element("cluster-ips", "1.1.1.1"), True),
        (lambda t: t.delete_chain("a"), True),
        (lambda t: t.delete_set("s", "type ipv4_addr ;"), True),
        (lambda t: t.delete_table(), True),
    ],
)
def test_has_deletes(build, deletes):
    tx = Transaction(set_specs=SPECS)
    build(tx)
    assert tx.has_deletes is deletes


# -- element coalescing ----------------------------------------------------------------------


def test_element_runs_are_coalesced():
    tx = Transaction()
    tx.add_element("cluster-ips", "10.0.0.1")
    tx.add_element("cluster-ips", "10.0.0.2")
    tx.add_element("cluster-ips", "10.0.0.3")
    tx.add_element("service-ips", "10.0.0.1 . tcp . 80", "goto a")
    tx.add_element("service-ips", "10.0.0.2 . tcp . 80", "goto b")
    tx.delete_element("service-ips", "10.0.0.9 . tcp . 80")
    tx.delete_element("service-ips", "10.0.0.8 . tcp . 80")
    tx.add_element("cluster-ips", "10.0.0.4")
    assert tx.render().splitlines() == [
        f"add element {W} cluster-ips {{ 10.0.0.1, 10.0.0.2, 10.0.0.3 }}",
        f"add element {W} service-ips {{ 10.0.0.1 . tcp . 80 : goto a, 10.0.0.2 . tcp . 80 : goto b }}",
        f"delete element {W} service-ips {{ 10.0.0.9 . tcp . 80, 10.0.0.8 . tcp . 80 }}",
        f"add element {W} cluster-ips {{ 10.0.0.4 }}",
    ]
    assert len(tx) == 8  # ops are still counted one by one


def test_other_ops_break_element_runs():
    tx = Transaction()
    tx.add_element("s", "1.1.1.1")
    tx.add_chain("c")
    tx.add_element("s", "1.1.1.2")
    assert tx.render().splitlines() == [
        f"add element {W} s {{ 1.1.1.1 }}", f"add chain {W} c", f"add element {W} s {{ 1.1.1.2 }}"]


def test_elements_are_chunked():
    assert ELEMENT_CHUNK == 1000
    tx = Transaction()
    n = 2 * ELEMENT_CHUNK + 500
    for i in range(n):
        tx.add_element("cluster-ips", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    lines = tx.render().splitlines()
    assert len(lines) == 3
    sizes = [line.count(",") + 1 for line in lines]
    assert sizes == [ELEMENT_CHUNK, ELEMENT_CHUNK, 500]
    assert all(line.startswith(f"add element {W} cluster-ips {{ ") for line in lines)
    assert "10.0.0.0" in lines[0] and "10.0.3.231" in lines[0]  # element 999
    assert lines[1].startswith(f"add element {W} cluster-ips {{ 10.0.3.232,")  # element 1000


def test_chunk_size_is_read_at_render_time(monkeypatch):
    monkeypatch.setattr(txmod, "ELEMENT_CHUNK", 2)
    tx = Transaction()
    for i in range(5):
        tx.add_element("s", f"1.1.1.{i}")
    assert [line.count(",") + 1 for line in tx.render().splitlines()] == [2, 2, 1]


# -- eager validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda t: t.add_chain("bad name"),
        lambda t: t.add_chain("bad;name"),
        lambda t: t.add_chain("bad\nname"),
        lambda t: t.add_chain(""),
        lambda t: t.add_chain("a{b"),
        lambda t: t.add_chain('a"b'),
        lambda t: t.flush_chain("x y"),
        lambda t: t.delete_chain("x;y"),
        lambda t: t.add_rule("bad name", "accept"),
        lambda t: t.add_rule("ok", ""),
        lambda t: t.add_rule("ok", "   "),
        lambda t: t.add_rule("ok", "accept\ndelete table ip pyproxy"),
        lambda t: t.add_set("bad set", "type ipv4_addr ;"),
        lambda t: t.delete_set("bad;set", "type ipv4_addr ;"),
        lambda t: t.add_element("bad set", "1.1.1.1"),
        lambda t: t.add_element("s", ""),
        lambda t: t.add_element("s", "1.1.1.1 }; delete table ip pyproxy; {"),
        lambda t: t.add_element("s", "1.1.1.1\n"),
        lambda t: t.add_element("s", "1.1.1.1 # comment"),
        lambda t: t.add_element("m", "1.1.1.1", "goto x; flush ruleset"),
        lambda t: t.delete_element("s", "{1.1.1.1}"),
        lambda t: t.add_elements([("bad set", "1.1.1.1", "")]),
        lambda t: t.add_elements([("s", "1.1.1.1 # comment", "")]),
        lambda t: t.add_elements([("m", "1.1.1.1", "goto x; flush ruleset")]),
        lambda t: t.add_elements([("s", "", "")]),
    ],
)
def test_invalid_op_sets_error_and_later_ops_are_ignored(build):
    tx = Transaction()
    tx.add_table()
    build(tx)
    assert tx.error is not None and tx.error.startswith("invalid ")
    assert len(tx) == 1
    tx.add_chain("fine")
    tx.add_rule("fine", "accept")
    assert len(tx) == 1  # ignored after the first error
    assert tx.render() == f"add table {W}\n"


@pytest.mark.parametrize("bad", [None, ("bad set", "1.1.1.1", ""), ("s", "1.1.1.9;", ""),
                                 ("m", "1.1.1.1", "goto {x}"), ("s", "", "")])
def test_bulk_element_additions_are_the_one_by_one_ones(bad):
    """add_elements checks a run at once; what it leaves (operations, first error) is what
    add_element would leave for each item in turn."""
    items = [("s", f"10.0.0.{i}", "") for i in range(5)] + [("m", "10.0.0.1 . tcp . 80", "goto svc-a")]
    if bad is not None:
        items.insert(3, bad)
    bulk, one = Transaction(), Transaction()
    bulk.add_elements(items)
    for item in items:
        one.add_element(*item)
    assert bulk.ops == one.ops and bulk.error == one.error
    assert (bulk.error is None) == (bad is None)
    if bad is not None:
        assert len(bulk.ops) == 3  # the items before the bad one, as one by one


def test_first_error_is_kept():
    tx = Transaction()
    tx.add_chain("first bad")
    tx.add_chain("second;bad")
    assert "first bad" in tx.error


@pytest.mark.parametrize("executor", [FakeNft(), NftCli(binary="/nonexistent/nft-never-run")])
def test_executor_refuses_a_transaction_with_an_error(executor):
    tx = Transaction()
    tx.add_table()
    tx.add_chain("bad name")
    with pytest.raises(NftError, match="transaction not run: invalid chain name"):
        executor.run(tx)


def test_fake_records_nothing_for_a_refused_transaction():
    nft = FakeNft()
    tx = Transaction()
    tx.add_table()
    tx.add_chain("x;y")
    with pytest.raises(NftError):
        nft.run(tx)
    assert nft.tables == {} and nft.transactions == []


@pytest.mark.parametrize(
    "build",
    [lambda t: t.add_chain("services\n"), lambda t: t.add_rule("services\n", "accept"),
     lambda t: t.add_set("cluster-ips\n", "type ipv4_addr ;"),
     lambda t: t.add_element("cluster-ips\n", "1.1.1.1")],
    ids=["chain", "rule", "set", "element"],
)
def test_name_with_trailing_newline_is_rejected(build):
    tx = Transaction()
    build(tx)
    assert tx.error is not None and tx.error.startswith("invalid ")
    assert len(tx) == 0 and tx.render() == ""


# -- FakeNft semantics -----------------------------------------------------------------------


def _base() -> FakeNft:
    nft = FakeNft()
    tx = Transaction()
    tx.add_table()
    tx.add_chain("a")
    tx.add_chain("b")
    tx.add_rule("a", "goto b")
    tx.add_set("m", "type ipv4_addr : verdict ;")
    tx.add_element("m", "1.1.1.1", "goto b")
    nft.run(tx)
    return nft


def test_fake_applies_a_transaction():
    nft = _base()
    t = nft.dump()
    assert t is not None
    assert t.chains == {"a": ["goto b"], "b": []}
    assert t.elements == {"m": {"1.1.1.1": "goto b"}}
    assert nft.table_exists("ip", "pyproxy") and not nft.table_exists("ip6", "pyproxy")
    assert len(nft.transactions) == 1


def test_fake_is_atomic():
    nft = _base()
    before = nft.dump()
    tx = Transaction()
    tx.add_chain("c")
    tx.add_rule("a", "accept")
    tx.add_rule("missing", "accept")  # the third op fails
    tx.add_chain("d")
    with pytest.raises(NftError, match="chain missing"):
        nft.run(tx)
    assert nft.dump() == before
    assert "c" not in nft.dump().chains and nft.dump().chains["a"] == ["goto b"]
    assert len(nft.transactions) == 1


def test_fake_needs_the_table():
    nft = FakeNft()
    tx = Transaction()
    tx.add_chain("a")
    with pytest.raises(NftError, match="table"):
        nft.run(tx)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda t: t.delete_chain("b"), "busy"),  # referenced by a rule and an element
        (lambda t: t.delete_chain("a"), "busy"),  # not empty
        (lambda t: t.delete_chain("zzz"), "No such"),
        (lambda t: t.flush_chain("zzz"), "No such"),
        (lambda t: t.add_element("m", "1.1.1.1", "goto a"), "File exists"),
        (lambda t: t.add_element("m", "2.2.2.2", "goto zzz"), "chain zzz"),
        (lambda t: t.add_element("nope", "2.2.2.2"), "set nope"),
        (lambda t: t.delete_element("m", "9.9.9.9"), "element 9.9.9.9"),
        (lambda t: t.add_rule("a", "jump zzz"), "chain zzz"),
        (lambda t: t.add_rule("a", "ip saddr @nope accept"), "set nope"),
        (lambda t: t.delete_set("nope", "type ipv4_addr ;"), "set nope"),
    ],
)
def test_fake_refuses_what_the_kernel_refuses(build, match):
    nft = _base()
    before = nft.dump()
    tx = Transaction()
    build(tx)
    with pytest.raises(NftError, match=match):
        nft.run(tx)
    assert nft.dump() == before


def test_fake_deleting_a_referenced_set_fails_until_the_rule_goes():
    nft = _base()
    tx = Transaction()
    tx.add_set("s", "type ipv4_addr ;")
    tx.add_rule("b", "ip saddr @s accept")
    nft.run(tx)
    tx = Transaction()
    tx.delete_set("s", "type ipv4_addr ;")
    with pytest.raises(NftError, match="busy"):
        nft.run(tx)
    tx = Transaction()
    tx.flush_chain("b")
    tx.delete_set("s", "type ipv4_addr ;")
    nft.run(tx)
    assert "s" not in nft.dump().sets


def test_fake_applies_rules_of_a_chain_declaration_and_checks_their_references():
    nft = _base()
    tx = Transaction()
    tx.add_chain("c", rules=("ip saddr 1.1.1.1 accept", "goto b"))
    tx.add_chain("c", rules=("drop",))  # appends, like nft
    nft.run(tx)
    assert nft.dump().chains["c"] == ["ip saddr 1.1.1.1 accept", "goto b", "drop"]
    before = nft.dump()
    for rule, match in (("goto zzz", "chain zzz"), ("ip saddr @nope accept", "set nope")):
        tx = Transaction()
        tx.add_chain("d", rules=(rule,))
        with pytest.raises(NftError, match=match):
            nft.run(tx)
        assert nft.dump() == before


def test_fake_same_element_same_value_is_fine():
    nft = _base()
    tx = Transaction()
    tx.add_element("m", "1.1.1.1", "goto b")
    nft.run(tx)
    assert nft.dump().elements["m"] == {"1.1.1.1": "goto b"}


def test_fake_delete_after_flush_and_unreference():
    nft = _base()
    tx = Transaction()
    tx.delete_element("m", "1.1.1.1")
    tx.flush_chain("a")
    tx.delete_chain("b")
    tx.delete_chain("a")
    nft.run(tx)
    assert nft.dump().chains == {}


def test_fake_table_delete_and_recreate_in_one_transaction():
    nft = _base()
    tx = Transaction()
    tx.add_table()
    tx.delete_table()
    tx.add_table("fresh")
    tx.add_chain("only")
    nft.run(tx)
    assert nft.dump().chains == {"only": []} and nft.dump().sets == {}


def test_fake_delete_missing_table_fails():
    nft = FakeNft()
    tx = Transaction()
    tx.delete_table()
    with pytest.raises(NftError):
        nft.run(tx)


def test_fake_fail_next_fails_once_and_changes_nothing():
    nft = _base()
    before = nft.dump()
    nft.fail_next = "boom"
    tx = Transaction()
    tx.add_chain("c")
    with pytest.raises(NftError, match="boom"):
        nft.run(tx)
    assert nft.dump() == before and nft.fail_next is None
    nft.run(tx)
    assert "c" in nft.dump().chains


def test_fake_delete_table_helper():
    nft = _base()
    assert nft.delete_table("ip", "pyproxy") is True
    assert nft.delete_table("ip", "pyproxy") is False
    assert nft.dump() is None


def test_fake_chain_spec_kept_and_removed():
    nft = FakeNft()
    tx = Transaction()
    tx.add_table()
    tx.add_chain("hook", "type nat hook prerouting priority -100 ;")
    nft.run(tx)
    assert nft.dump().chain_specs == {"hook": "type nat hook prerouting priority -100 ;"}
    tx = Transaction()
    tx.delete_chain("hook")
    nft.run(tx)
    assert nft.dump().chain_specs == {}
