"""pyproxy.model.ipaddr: sloppy-but-safe IP parsing with canonical output."""

from __future__ import annotations

import pytest

from pyproxy.model.ipaddr import BadAddress, canonical_cidr, canonical_ip, ip_in_cidrs


# Upstream kube-proxy's TestBadIPs: objects validated by an old API server may carry IPv4
# octets with leading zeros, which Go read as decimal; the rules must hold canonical text.
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("172.30.0.041", "172.30.0.41"),
        ("1.2.3.004", "1.2.3.4"),
        ("192.168.099.022", "192.168.99.22"),
        ("10.180.00.001", "10.180.0.1"),
        ("000.000.000.000", "0.0.0.0"),
        ("255.255.255.255", "255.255.255.255"),
        ("10.0.0.1", "10.0.0.1"),
        (" 10.0.0.1 ", "10.0.0.1"),  # surrounding blanks are tolerated
    ],
)
def test_ipv4_is_canonicalised(text, want):
    assert canonical_ip(text) == (want, 4)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("fd00:0:0:0:0:0:0:a", "fd00::a"),
        ("::1", "::1"),
        ("::", "::"),
    ],
)
def test_ipv6_is_canonicalised(text, want):
    assert canonical_ip(text) == (want, 6)


@pytest.mark.parametrize(
    "text",
    [
        "256.1.1.1",
        "1.2.3",
        "1.2.3.4.5",
        "0x10.0.0.1",
        "+1.2.3.4",
        "1.2.3.-4",
        "1..2.3",
        "1.2.3.0004",  # more than three digits
        "1.2.3.4/32",  # a CIDR is not an IP
        "",
        "   ",
        None,
        1234,
        b"1.2.3.4",
        "abc",
        "1.2.3.٤",  # a non-ASCII digit
        "2001:db8::g",
        ":::",
    ],
)
def test_bad_ips_are_rejected(text):
    with pytest.raises(BadAddress):
        canonical_ip(text)


def test_bad_address_is_a_value_error_and_quotes_the_input():
    with pytest.raises(ValueError, match="256.1.1.1"):
        canonical_ip("256.1.1.1")


@pytest.mark.parametrize(
    ("text", "want", "family"),
    [
        ("203.0.113.000/025", "203.0.113.0/25", 4),
        ("10.0.0.7/8", "10.0.0.0/8", 4),  # host bits cleared
        ("10.244.0.0/16", "10.244.0.0/16", 4),
        ("0.0.0.0/0", "0.0.0.0/0", 4),
        ("1.2.3.4/32", "1.2.3.4/32", 4),
        ("2001:DB8::1/64", "2001:db8::/64", 6),
        ("fd00::/128", "fd00::/128", 6),
    ],
)
def test_cidrs_are_canonicalised(text, want, family):
    assert canonical_cidr(text) == (want, family)


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4/33", "1.2.3.4", "1.2.3.4/", "1.2.3.4/-1", "1.2.3.4/x", "/24", "256.0.0.0/8",
     "2001:db8::/129", "", None, "abc", "abc/8"],
)
def test_bad_cidrs_are_rejected(text):
    with pytest.raises(BadAddress):
        canonical_cidr(text)


@pytest.mark.parametrize(
    ("ip", "cidrs", "want"),
    [
        ("10.0.0.1", ("10.0.0.0/8",), True),
        ("11.0.0.1", ("10.0.0.0/8",), False),
        ("11.0.0.1", ("10.0.0.0/8", "11.0.0.0/24"), True),
        ("192.168.1.1", (), False),
        ("192.168.1.1", ("192.168.1.1/32",), True),
    ],
)
def test_ip_in_cidrs(ip, cidrs, want):
    assert ip_in_cidrs(ip, cidrs) is want


@pytest.mark.parametrize("text", ["fe80::1%eth0", "fe80::1%1", "::1%lo"])
def test_ipv6_scope_id_is_rejected(text):
    # Sockets accept a zone; the API (Go's parser) does not.
    with pytest.raises(BadAddress):
        canonical_ip(text)
    with pytest.raises(BadAddress):
        canonical_cidr(text + "/128")


def test_ipv6_without_zone_is_still_accepted():
    assert canonical_ip("fe80::1") == ("fe80::1", 6)


@pytest.mark.parametrize("prefix", ["\u0668", "1\u0666", "\uff18", "\u00b2"])
def test_cidr_prefix_with_non_ascii_digit_is_rejected(prefix):
    # str.isdigit accepts Arabic-Indic, full-width and superscript digits; the API does not.
    with pytest.raises(BadAddress):
        canonical_cidr("10.0.0.0/" + prefix)


def test_cidr_prefix_with_ascii_digits_is_still_accepted():
    assert canonical_cidr("10.0.0.0/8")[0] == "10.0.0.0/8"
