"""iptables-restore commits each table on its own: a payload whose nat table is refused used to
leave its filter table applied (hardening issue, defect 7). The executor now checks the whole
payload with ``--test`` first, so nothing changes unless everything can."""

from __future__ import annotations

import pytest

from pyproxy.ipt.executor import IptablesCli, IptablesError
from pyproxy.ipt.restore import RestorePayload
from pyproxy.lab.netns import Topology, ns_exec

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_a_refused_nat_table_leaves_the_filter_table_unchanged(topo: Topology, backend: str):
    cli = IptablesCli(backend=backend, netns=topo.node_ns)
    try:
        cli.restore(RestorePayload(rewrite={("filter", "PYPROXY-TEST-F"): ("-j RETURN",),
                                            ("nat", "PYPROXY-TEST-N"): ("-j RETURN",)}))
        bad = RestorePayload(rewrite={("filter", "PYPROXY-TEST-F"): ("-j ACCEPT",),
                                      ("nat", "PYPROXY-TEST-N"): ("-j PYPROXY-MISSING",)})
        with pytest.raises(IptablesError, match="refused before any table changed"):
            cli.restore(bad)
        saved = ns_exec(topo.node_ns, [f"iptables-{backend}-save"]).stdout
        assert "-A PYPROXY-TEST-F -j RETURN" in saved and "-A PYPROXY-TEST-F -j ACCEPT" not in saved
        assert "-A PYPROXY-TEST-N -j RETURN" in saved
    finally:
        cli.restore(RestorePayload(delete={("filter", "PYPROXY-TEST-F"), ("nat", "PYPROXY-TEST-N")}))
