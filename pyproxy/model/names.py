"""Kubernetes name rules, checked as the API server checks them.

Names end up in rule text (chain names, comments), so anything the API server would refuse is
refused here too: a hand-written file can then never smuggle a space, a quote, a line break or
a 300-character name into an nft script or an iptables-restore payload. Everything the API
server accepts passes, so no object of a real cluster is ever lost to these checks.

The rules (k8s.io/apimachinery/pkg/util/validation):

* DNS-1123 label: at most 63 characters, lower-case letters, digits and ``-``, starting and
  ending with a letter or digit. Namespaces, Service names (since the relaxed Service name
  validation; DNS-1035 labels, which must start with a letter, are a subset), Service and
  EndpointSlice port names.
* DNS-1123 subdomain: at most 253 characters, DNS-1123 labels joined by ``.``. EndpointSlice
  and Node names.
* Label value: at most 63 characters, letters, digits, ``-``, ``_`` and ``.``, starting and
  ending with a letter or digit, or empty. Zones.
"""

from __future__ import annotations

import re
from functools import lru_cache

LABEL_MAX = 63
SUBDOMAIN_MAX = 253

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def _shown(value: str) -> str:
    """The offending value for a message: repr (control characters visible), cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problem(value: str, *, most: int, pattern: re.Pattern[str], rule: str) -> str | None:
    if len(value) > most:
        return f"must be at most {most} characters, got {len(value)}"
    if not pattern.fullmatch(value):
        return f"must be {rule}, got {_shown(value)}"
    return None


@lru_cache(maxsize=1 << 16)  # the same node, zone and namespace names come 100k times
def dns_label_problem(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 label, or None."""
    return _problem(value, most=LABEL_MAX, pattern=_LABEL, rule="a DNS-1123 label (lower-case letters, "
                    "digits and '-', starting and ending with a letter or digit)")


@lru_cache(maxsize=1 << 16)  # the same node, zone and namespace names come 100k times
def dns_subdomain_problem(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 subdomain, or None."""
    return _problem(value, most=SUBDOMAIN_MAX, pattern=_SUBDOMAIN, rule="a DNS-1123 subdomain (lower-case "
                    "letters, digits, '-' and '.', starting and ending with a letter or digit)")


@lru_cache(maxsize=1 << 16)  # the same node, zone and namespace names come 100k times
def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a label value, or None."""
    return _problem(value, most=LABEL_MAX, pattern=_LABEL_VALUE, rule="a label value (letters, digits, "
                    "'-', '_' and '.', starting and ending with a letter or digit)")
