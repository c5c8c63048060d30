"""iptables-restore commits each table on its own: a payload whose nat table is refused used to
leave its filter table applied (hardening issue, defect 7), so the README's "a refused ruleset
leaves the previous one in place" was not true in iptables mode. The proxier now puts the filter
table back when nat is refused; the next sync is a full one."""

from __future__ import annotations

import pytest

from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import IptablesCli
from pyproxy.ipt.restore import RestorePayload
from lab.netns import Topology, ns_exec
from pyproxy.proxier.base import SyncFailed
from pyproxy.proxier.iptables import IptProxier
from tests import scenario as sc
from tests.unit.helpers import build

pytestmark = pytest.mark.netns


class NatRefused(IptablesCli):
    """The real binaries; when armed, the payload's nat table gets a jump to a missing chain,
    which the kernel refuses after the filter table was committed."""

    armed = False

    def restore(self, payload: RestorePayload) -> None:
        if self.armed and "nat" in payload.tables:
            payload = RestorePayload(rewrite={**payload.rewrite, ("nat", "PYPROXY-BROKEN"): ("-j PYPROXY-MISSING",)},
                                     delete=set(payload.delete))
        super().restore(payload)


def _state(ready: bool):  # type: ignore[no-untyped-def]
    svc = sc.service("web", "10.96.0.10", [sc.port(80, name="http")])
    sl = sc.endpoint_slice("web", ["10.244.0.5"], [sc.port(8080, name="http")], conditions={"ready": ready,
                           "serving": ready})
    return build([svc, sl])


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_a_refused_nat_table_leaves_the_filter_table_as_it_was(topo: Topology, backend: str):
    def filter_rules() -> list[str]:
        return [ln for ln in ns_exec(topo.node_ns, [f"iptables-{backend}-save", "-t", "filter"]).stdout.splitlines()
                if "PYPROXY" in ln and not ln.startswith("#")]

    executor = NatRefused(backend=backend, netns=topo.node_ns)
    proxier = IptProxier(config=ProxyConfig(mode="iptables", hostname="node-1"), executor=executor)
    try:
        proxier.sync(_state(ready=False))  # no endpoint: a REJECT rule in filter
        before = filter_rules()
        assert any("REJECT" in r for r in before)
        executor.armed = True
        # The endpoint turns ready: filter loses the REJECT, nat gains the DNAT (refused).
        with pytest.raises(SyncFailed, match="previous rules kept"):
            proxier.sync(_state(ready=True))
        assert filter_rules() == before
        executor.armed = False
        result = proxier.sync(_state(ready=True))
        assert result.full and not any("REJECT" in r for r in filter_rules())
    finally:
        proxier.cleanup()
