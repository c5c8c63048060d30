"""A seeded generator of adversarial cluster objects, and the checks every one must pass.

Each batch mixes valid *canary* Services (ClusterIPs in 10.250.0.0/16 and NodePorts 32000+, which
nothing else uses, each with endpoints) with mutated objects: wrong types, missing and null
fields, huge numbers, unicode, control characters, quotes/semicolons/braces/iptables commands in
every string field, IPv6 and CIDR oddities, 1,000 ports, duplicates, deep nesting and long
strings. The store, the merge and both renderers must take every batch without raising, program
every canary, and write nothing of an object's text outside the field it belongs in.

``tests/unit/test_fuzz.py`` runs a fixed set of seeds; ``tests/netns/test_fuzz_kernel.py`` loads
the rendered rulesets into the kernel's checkers (``nft -c`` in a fresh namespace,
``iptables-restore --test``). For longer runs::

    python -m tests.fuzz --seconds 600            # random seeds for ten minutes, prints a table
    python -m tests.fuzz --seed 1234 --objects 20000
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pyproxy.config import ProxyConfig
from pyproxy.ipt.executor import FakeIptables
from pyproxy.model.objects import DesiredState
from pyproxy.model.state import StateBuilder
from pyproxy.nft.executor import FakeNft
from pyproxy.proxier.iptables import IptProxier
from pyproxy.proxier.nftables import NftProxier
from tests import scenario as sc

NODE = "node-1"
MARK = "ZQXINJ"
"""Every hostile string carries this, so its text can be traced in the output."""

HOSTILE = [
    f"{MARK}\n-I INPUT 1 -j ACCEPT", f"{MARK}\nCOMMIT\n*filter\n-F INPUT", f'{MARK}"; flush ruleset; "',
    f"{MARK} }} ; add rule ip filter input accept ; {{", f"{MARK}#comment", f"{MARK}\x00nul",
    f"{MARK}\r\n", f"{MARK}$(reboot)", f"{MARK}`id`", f"{MARK}\\", f"{MARK}'", f"{MARK}\u202e\u200b",
    f"{MARK}caf\u00e9", f"{MARK}\U0001f4a5", f"{MARK}\t", f"{MARK}\x1b[31m", f"{MARK} " * 40,
    f"{MARK}" + "a" * 300, f"{MARK}-" * 30, "", " ", "-", ".", "a..b", "A", "1" * 64,
]
ODD_IPS = [
    "::ffff:10.0.0.1", "10.0.0.1/33", "fe80::1%eth0", "1.2.3", "0.0.0.0", "255.255.255.255", "::",
    "10.0.0.010", " 10.0.0.1", "10.0.0.1\n", "fd00::1", "FD00::0001", "10.0.0.256", "1e3", "0x0a000001",
    "10.0.0.0/8", "::1", "127.0.0.1", "224.0.0.1", "2001:db8::/129", "10.0.0.1/0", "0.0.0.0/0", "::/0",
    f"10.0.0.1 {MARK}", "1.1.1.1,2.2.2.2", "",
]
WRONG = [None, True, False, 0, -1, 1, 65535, 65536, 2**31, 2**63, 2**64, -2**63, 1.5, float("nan"),
         float("inf"), [], {}, [1], {"a": 1}, "80", "TCP", "tcp", "SCTP", "ICMP"]


def _ip(rng: random.Random, family: int = 4) -> str:
    """An address outside the canaries' 10.250.0.0/16."""
    if family == 6:
        return f"fd00:{rng.randrange(1, 0xffff):x}::{rng.randrange(1, 0xffff):x}"
    return f"10.{rng.choice([96, 97, 98, 244])}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _name(rng: random.Random) -> str:
    return rng.choice(["web", "db", "a", "x" * 63, "svc-1", "1st"]) + f"-{rng.randrange(10**6)}"


def valid_service(rng: random.Random) -> list[dict[str, Any]]:
    """A valid Service (any type) and its slices, to be mutated."""
    name, ns = _name(rng), rng.choice(["default", "kube-system", "n" * 63, "e2e"])
    svc_type = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
    fam = rng.choice([4, 4, 6])
    ports = [sc.port(rng.randrange(1, 65536), name=f"p{k}", protocol=rng.choice(["TCP", "UDP", "SCTP"]),
                     node_port=rng.randrange(30000, 32000) if svc_type != "ClusterIP" else None)
             for k in range(rng.randrange(1, 4))]
    svc = sc.service(name, _ip(rng, fam), ports, namespace=ns, svc_type=svc_type,
                     affinity_timeout=rng.choice([None, 1, 10800]))
    spec = svc["spec"]
    if rng.random() < 0.3:
        spec["externalIPs"] = [_ip(rng, fam)]
    if svc_type == "LoadBalancer":
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": _ip(rng, fam)}]}}
        if rng.random() < 0.5:
            spec["loadBalancerSourceRanges"] = [rng.choice(["0.0.0.0/0", "203.0.113.0/24", "fd00::/8"])]
        if rng.random() < 0.5:
            spec["externalTrafficPolicy"] = "Local"
            spec["healthCheckNodePort"] = rng.randrange(30000, 32000)
    if rng.random() < 0.2:
        spec["internalTrafficPolicy"] = "Local"
    sl = sc.endpoint_slice(name, [_ip(rng, fam) for _ in range(rng.randrange(0, 4))],
                           [sc.port(p["port"], name=p["name"], protocol=p["protocol"]) for p in ports],
                           namespace=ns, node=rng.choice([NODE, "node-2"]))
    sl["addressType"] = f"IPv{fam}"
    if rng.random() < 0.3:
        for ep in sl["endpoints"]:
            ep["conditions"] = {"ready": rng.random() < 0.5, "serving": rng.random() < 0.5,
                                "terminating": rng.random() < 0.5}
            ep["zone"] = "zone-a"
            ep["hints"] = {"forZones": [{"name": "zone-a"}]}
    return [svc, sl]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _nasty(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(HOSTILE)
    if roll < 0.6:
        return rng.choice(ODD_IPS)
    return copy.deepcopy(rng.choice(WRONG))


def mutate(obj: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """1-3 random changes: a value replaced by a nasty one, a key deleted or nulled."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.randrange(1, 4)):
        paths = [p for p in _paths(obj) if p]
        path = rng.choice(paths)
        parent: Any = obj
        for step in path[:-1]:
            parent = parent[step]
        roll = rng.random()
        if roll < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif roll < 0.25:
            parent[path[-1]] = None
        else:
            parent[path[-1]] = _nasty(rng)
    return obj


def bombs(rng: random.Random) -> list[Any]:
    """The big and the strange: 1,000 ports, 1,000 endpoints, deep nesting, long strings,
    duplicates, objects that are not objects, and our Node with hostile fields."""
    many_ports = sc.service(f"ports-{rng.randrange(10**6)}", _ip(rng),
                            [sc.port(1 + k, name=f"p{k}") for k in range(1000)])
    many_eps = sc.endpoint_slice(many_ports["metadata"]["name"], [f"10.244.{k // 250}.{k % 250 + 1}" for k in range(1000)],
                                 [sc.port(8080, name="p0")])
    deep: Any = MARK
    for _ in range(300):
        deep = {"d": [deep]}
    deep_svc = sc.service(f"deep-{rng.randrange(10**6)}", _ip(rng), [sc.port(80)])
    deep_svc["metadata"]["annotations"] = {"x": deep}
    long_svc = sc.service(f"long-{rng.randrange(10**6)}", _ip(rng), [sc.port(80)])
    long_svc["metadata"]["labels"] = {"big": MARK * 100_000}
    dup = valid_service(rng)
    dup2 = copy.deepcopy(dup)
    dup2[0]["spec"]["clusterIP"] = dup2[0]["spec"]["clusterIPs"][0] = _ip(rng)
    node = sc.node(NODE, [_ip(rng), rng.choice(ODD_IPS)])
    node["metadata"]["labels"] = {"topology.kubernetes.io/zone": rng.choice(HOSTILE + ["zone-a"])}
    return [many_ports, many_eps, deep_svc, long_svc, *dup, *dup2, node, [], 3, "Service", None,
            {"kind": ["Service"]}, {"kind": "Service"}, {"kind": "EndpointSlice", "metadata": []},
            {"kind": "Node", "metadata": {"name": NODE}, "status": {"addresses": "10.0.0.1"}}]


def canaries(n: int) -> list[dict[str, Any]]:
    out = []
    for k in range(n):
        name = f"canary-{k}"
        out.append(sc.service(name, f"10.250.{k // 250}.{k % 250 + 1}",
                              [sc.port(80, name="http", node_port=32000 + k)], namespace="canary",
                              svc_type="NodePort"))
        out.append(sc.endpoint_slice(name, [f"10.251.{k // 250}.{k % 250 + 1}"], [sc.port(8080, name="http")],
                                     namespace="canary"))
    return out


def generate(seed: int, objects: int = 2000, canary_count: int = 20) -> list[Any]:
    """``objects`` adversarial objects (about) plus bombs and canaries, shuffled."""
    rng = random.Random(seed)
    out: list[Any] = [*bombs(rng), *canaries(canary_count)]
    while len(out) < objects + canary_count * 2:
        pair = valid_service(rng)
        out += [mutate(o, rng) if rng.random() < 0.8 else o for o in pair]
    rng.shuffle(out)
    return out


# -- the checks --------------------------------------------------------------------------------

CFG = ProxyConfig(hostname=NODE, cluster_cidrs=("10.244.0.0/16", "fd00:244::/32"))
_NFT_NAME = r"[A-Za-z0-9_./-]+"
_NFT_LINE = re.compile(rf"(add|delete) (table|chain|set|map|element|rule) ip6? pyproxy( {_NFT_NAME})?( .*)?")
_IPT_LINE = re.compile(r"\*(filter|nat)|:PYPROXY-[A-Z0-9-]+ - \[0:0\]|-A PYPROXY-[A-Z0-9-]+ .+|-X PYPROXY-[A-Z0-9-]+|COMMIT")
_COMMENT = re.compile(r'comment "([^"]*)"')
_SAFE_COMMENT = re.compile(r"[A-Za-z0-9 ._:/()\[\]>,+=?;-]*")  # ; in our own fixed comments


class Broken(AssertionError):
    """A check failed; the message says which and where."""


@dataclass
class Rendered:
    family: int
    nft: str
    ipt: str
    state: DesiredState


@dataclass
class Report:
    batches: int = 0
    objects: int = 0
    problems: int = 0
    canaries: int = 0
    lost_canaries: int = 0
    failures: list[str] = field(default_factory=list)


def render(objects: list[Any]) -> list[Rendered]:
    """Both families through the store and both renderers (what ``pyproxy render`` does)."""
    out = []
    for cfg in CFG.family_configs():
        builder = StateBuilder(node_name=NODE, family=cfg.family)
        builder.replace_all(objects)
        state = builder.build(nodeport_ips=("192.168.1.1",) if cfg.family == 4 else ("fd00:1::1",))
        nft = NftProxier(config=cfg, executor=FakeNft()).render_text(state)
        ipt = IptProxier(config=cfg, executor=FakeIptables(family=cfg.family)).render_text(state)
        out.append(Rendered(cfg.family, nft, ipt, state))
    return out


def check(objects: list[Any], canary_count: int) -> list[Rendered]:
    """Render ``objects`` and raise Broken on the first broken promise."""
    try:
        rendered = render(objects)
    except Exception as err:  # noqa: BLE001 - any exception is the finding
        raise Broken(f"crash: {type(err).__name__}: {err}") from err
    v4 = next(r for r in rendered if r.family == 4)
    names = {n.name for n in v4.state.services}
    lost = [f"canary-{k}" for k in range(canary_count) if f"canary-{k}" not in names]
    if lost:
        raise Broken(f"canaries lost: {lost[:5]} (problems: {[str(p) for p in v4.state.problems][:5]})")
    for k in range(canary_count):
        cip, ep = f"10.250.{k // 250}.{k % 250 + 1}", f"10.251.{k // 250}.{k % 250 + 1}:8080"
        # nftables: the endpoint is the data of the one slot range of the service's pool.
        if f"{cip} . tcp . 80 : goto service-" not in v4.nft or \
                f" : {ep.replace(':', ' . ')}" not in v4.nft:
            raise Broken(f"canary-{k} is not programmed in nft")
        if f"-d {cip}/32 --dport 80" not in v4.ipt or f"--to-destination {ep}" not in v4.ipt:
            raise Broken(f"canary-{k} is not programmed in iptables")
    for r in rendered:
        for line in r.nft.splitlines():
            if not _NFT_LINE.fullmatch(line):
                raise Broken(f"IPv{r.family} nft line of unexpected shape: {line[:200]!r}")
            for comment in _COMMENT.findall(line):
                if not _SAFE_COMMENT.fullmatch(comment) or len(comment) > 128:
                    raise Broken(f"nft comment out of bounds: {comment!r}")
            if MARK in _COMMENT.sub("", line):
                raise Broken(f"object text outside a comment: {line[:200]!r}")
        for line in r.ipt.splitlines():
            if not _IPT_LINE.fullmatch(line):
                raise Broken(f"IPv{r.family} iptables line of unexpected shape: {line[:200]!r}")
            if line.startswith("-A "):
                try:
                    words = shlex.split(line)
                except ValueError as err:
                    raise Broken(f"iptables line that does not parse ({err}): {line[:200]!r}") from None
                if "--comment" in words:
                    comment = words[words.index("--comment") + 1]
                    if not _SAFE_COMMENT.fullmatch(comment) or len(comment) > 255:
                        raise Broken(f"iptables comment out of bounds: {comment!r}")
                    words.pop(words.index("--comment") + 1)
                if any(MARK in w for w in words):
                    raise Broken(f"object text outside a comment: {line[:200]!r}")
    return rendered


def run(seeds: list[int], *, objects: int, canary_count: int = 20) -> Report:
    report = Report()
    for seed in seeds:
        batch = generate(seed, objects, canary_count)
        report.batches += 1
        report.objects += len(batch)
        report.canaries += canary_count
        try:
            rendered = check(batch, canary_count)
            report.problems += len(rendered[0].state.problems)
        except Broken as err:
            report.failures.append(f"seed {seed}: {err}")
            if "canaries lost" in str(err):
                report.lost_canaries += 1
    return report


def per_object(seeds: list[int], *, objects: int, canary_count: int = 5) -> dict[str, int]:
    """Each adversarial object alone with a few canaries: outcomes by kind (for a before and
    after table: which objects crash the renderers, which cost the canaries)."""
    outcomes: dict[str, int] = {}
    base = canaries(canary_count)
    for seed in seeds:
        for obj in generate(seed, objects, 0):
            try:
                check([*base, obj], canary_count)
                kind = "ok"
            except Broken as err:
                text = str(err)
                kind = text.split(":")[0] + (": " + text.split(":")[1].strip() if text.startswith("crash") else "")
            outcomes[kind] = outcomes.get(kind, 0) + 1
    return outcomes


def main() -> int:
    p = argparse.ArgumentParser(description="Fuzz pyproxy's model and renderers with adversarial objects.")
    p.add_argument("--per-object", action="store_true",
                   help="check each object alone with the canaries and count outcomes by kind")
    p.add_argument("--seconds", type=float, default=0, help="run random seeds for this long")
    p.add_argument("--seed", type=int, action="append", default=[], help="run these seeds")
    p.add_argument("--objects", type=int, default=2000, help="adversarial objects per batch")
    a = p.parse_args()
    t0 = time.monotonic()
    if a.per_object:
        outcomes = per_object(a.seed or [1], objects=a.objects)
        print("| outcome | objects |\n|---|---|")
        for kind, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
            print(f"| {kind} | {n:,} |")
        return 0 if set(outcomes) == {"ok"} else 1
    report = Report()
    seeds = list(a.seed) or []
    rng = random.Random()
    while True:
        batch_seeds = seeds[:1] if seeds else [rng.randrange(2**32)]
        seeds = seeds[1:]
        r = run(batch_seeds, objects=a.objects)
        for name in ("batches", "objects", "problems", "canaries", "lost_canaries"):
            setattr(report, name, getattr(report, name) + getattr(r, name))
        report.failures += r.failures
        if not seeds and time.monotonic() - t0 >= a.seconds:
            break
    print("| batches | objects | invalid objects skipped | canaries | batches losing canaries | failures | seconds |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {report.batches} | {report.objects:,} | {report.problems:,} | {report.canaries:,} | "
          f"{report.lost_canaries} | {len(report.failures)} | {time.monotonic() - t0:.0f} |")
    for f in report.failures[:20]:
        print(f, file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Broken", "canaries", "check", "generate", "render", "run"]
