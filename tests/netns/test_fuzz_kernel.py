"""The fuzz corpus's rulesets, loaded into the kernel's own checkers: ``nft -c`` in a fresh
namespace and ``iptables-restore --test`` / ``ip6tables-restore --test`` on both backends accept
every output (hardening issue). A ruleset the kernel would refuse is a node without Services."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from lab.netns import Topology
from tests import fuzz

pytestmark = pytest.mark.netns


@pytest.fixture
def fresh_ns(topo: Topology) -> str:  # type: ignore[misc]
    """A namespace of its own, so that nothing of the check touches the lab's rules."""
    name = f"pxtfz-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("seed", [1, 2])
def test_kernel_accepts_every_fuzzed_ruleset(fresh_ns: str, tmp_path: Path, seed: int):
    rendered = fuzz.check(fuzz.generate(seed, objects=2000, canary_count=20), canary_count=20)
    for r in rendered:
        nft = tmp_path / f"ruleset{r.family}.nft"
        nft.write_text(r.nft)
        proc = subprocess.run(["ip", "netns", "exec", fresh_ns, "nft", "-c", "-f", str(nft)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"IPv{r.family} nft: {proc.stderr[:2000]}"
        tool = "ip6tables" if r.family == 6 else "iptables"
        for backend in ("nft", "legacy"):
            proc = subprocess.run(["ip", "netns", "exec", fresh_ns, f"{tool}-{backend}-restore", "--test", "--noflush"],
                                  input=r.ipt, capture_output=True, text=True)
            assert proc.returncode == 0, f"{tool}-{backend}: {proc.stderr[:2000]}"
