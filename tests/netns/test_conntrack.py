"""Stale UDP conntrack: a client that never stops sending follows its service to a new backend
within one sync, because pyproxy deletes the entries the new rules orphaned."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.netns.conftest import DNS_IP, Programmed, base_objects

pytestmark = pytest.mark.netns


def _with_dns_backends(objects: list[dict], ips: list[str]) -> list[dict]:
    for obj in objects:
        if obj["metadata"]["name"] == "dns-a":
            obj["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]
    return objects


def test_udp_client_follows_a_replaced_backend_within_one_sync(programmed: Programmed):
    topo = programmed.topo
    pod0, pod1 = topo.pod("pod0").ip, topo.pod("pod1").ip
    programmed.apply(_with_dns_backends(base_objects(topo), [pod0]))
    stream = subprocess.Popen(
        ["ip", "netns", "exec", topo.pod("pod3").ns, sys.executable, "-m", "pyproxy.lab.client",
         "--target", f"{DNS_IP}:53", "--udp-stream", "6", "--interval", "0.05"],
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the flow is established, to pod0
        programmed.apply(_with_dns_backends(base_objects(topo), [pod1]))  # sync + conntrack cleanup
        switched_at = time.monotonic()
        out, _ = stream.communicate(timeout=30)
    finally:
        if stream.poll() is None:
            stream.kill()
    replies = [json.loads(line) for line in out.splitlines()]
    before = [r["pod"] for r in replies if r["t"] < switched_at - 1.0]
    after = [r["pod"] for r in replies if r["t"] > switched_at + 0.2]
    assert before and set(before) == {"pod0"}, before
    # The same socket, the same source port: without the cleanup its conntrack entry would keep
    # the old DNAT to pod0 for as long as it keeps sending (it would time out after 10 s idle).
    assert after and set(after) == {"pod1"}, after
