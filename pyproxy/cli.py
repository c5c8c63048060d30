"""The ``pyproxy`` command: render, run and cleanup, with kube-proxy's flag names."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence

from pyproxy import __version__, gcpolicy
from pyproxy.config import PROXY_MODES, ProxyConfig
from pyproxy.factory import make_proxier, resolve_backend
from pyproxy.ipt.executor import IptablesError
from pyproxy.literals import BackendChoice, Family
from pyproxy.model.ipaddr import BadAddress, canonical_cidr
from pyproxy.proxier.base import SyncFailed
from pyproxy.settings import DEFAULTS, FILE_MIN_SYNC_PERIOD, ConntrackSettings, Settings, SetupError
from pyproxy.snapshot import FileSource, api_snapshot, file_sources
from pyproxy.sources.file import SourceError
from pyproxy.sources.errors import KubeError

log = logging.getLogger("pyproxy")


class UsageError(Exception):
    """Bad flags or input; the message says what to do."""


def _cidr_list(text: str, flag: str, *, keywords: tuple[str, ...] = ()) -> tuple[str, ...]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in keywords:
            out.append(item)
            continue
        try:
            cidr, _ = canonical_cidr(item)
        except BadAddress:
            raise UsageError(f"{flag}: {item!r} is not a CIDR; write it like 10.244.0.0/16 "
                             "or fd00:10::/64") from None
        out.append(cidr)
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyproxy",
        description="A readable kube-proxy: Services and EndpointSlices become nftables or "
        "iptables rules. Flags are named like kube-proxy's.",
    )
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, api: bool = False) -> None:
        p.add_argument("--source-file", metavar="FILE", required=not api,
                       help="YAML with Services, EndpointSlices and Nodes: several documents, "
                       "or a 'kind: List' as 'kubectl get -o yaml' writes it"
                       + (" (instead of the API)" if api else ""))
        if api:
            p.add_argument("--kubeconfig", metavar="FILE", default=None,
                           help="watch the API server named in this kubeconfig; without it and "
                           "without --source-file, use the in-cluster service account "
                           "(KUBERNETES_SERVICE_HOST must be the real API server address, not "
                           "a ClusterIP pyproxy itself programs)")
        p.add_argument("--hostname-override", metavar="NODE", default=None,
                       help="this node's name: picks the Node object for NodePort addresses "
                       "(default: the host name)")
        p.add_argument("--proxy-mode", choices=PROXY_MODES, default="nftables",
                       help="nftables (default) or iptables: the kernel balances; userspace: the "
                       "kernel redirects to pyproxy, which copies bytes (for comparison; the client "
                       "IP is lost, a refused backend is retried)")
        p.add_argument("--cluster-cidr", metavar="CIDRS", default="",
                       help="comma-separated pod network CIDRs; ClusterIP traffic from outside "
                       "them is masqueraded, pod traffic keeps its source IP")
        p.add_argument("--nodeport-addresses", metavar="CIDRS", default="",
                       help="comma-separated CIDRs; NodePorts answer only on node addresses "
                       "inside them; 'primary': only the node's primary address (its Node "
                       "object's first InternalIP) (default: all node addresses except loopback)")
        p.add_argument("--masquerade-all", action="store_true",
                       help="masquerade all traffic sent to ClusterIPs")
        p.add_argument("--iptables-masquerade-bit", type=int, default=14, metavar="BIT",
                       help="packet mark bit (0-31) that flags traffic for masquerading (default 14)")
        p.add_argument("--ip-families", default="4,6", metavar="LIST",
                       help="which IP families to program: 4, 6 or 4,6 (default 4,6: each family has "
                       "its own table or ip6tables chains and syncs on its own, so one family's "
                       "failure cannot break the other; userspace mode is IPv4 only)")
        p.add_argument("--iptables-localhost-nodeports", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="iptables mode: NodePorts also answer on 127.0.0.1 when loopback is among "
                       "the NodePort addresses; sets route_localnet=1 and adds the CVE-2020-8558 "
                       "martian-packet drop rule (default off; nftables mode has none)")
        p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto",
                       help="iptables mode only: which iptables binaries to drive; auto picks "
                       "the one already holding rules, as iptables-wrapper does (default auto)")
        p.add_argument("-v", "--v", dest="verbosity", type=int, default=1, metavar="N",
                       help="log verbosity: 0 warnings, 1 info (default), 2 debug")
        p.add_argument("--config", metavar="FILE",
                       help="a KubeProxyConfiguration (the fields that apply) or a YAML of flag: value "
                       "pairs (e.g. 'proxy-mode: iptables'), read first; command-line flags override it")
        p.add_argument("--write-config-to", metavar="FILE",
                       help="write the effective configuration as a KubeProxyConfiguration to FILE "
                       "('-' for stdout) and exit")

    render = sub.add_parser("render", help="print the ruleset that would be applied; change nothing")
    common(render)

    run = sub.add_parser("run", help="apply the ruleset in this network namespace and keep it in sync")
    common(run, api=True)
    run.add_argument("--once", action="store_true", help="sync once and exit (0 on success)")
    run.add_argument("--min-sync-period", type=float, default=None, metavar="SECONDS",
                     help="least time between two syncs; changes arriving meanwhile are batched "
                     f"(default {DEFAULTS.min_sync_period:g} with the API: a sync of one change costs ~30 ms, so this bounds "
                     "pyproxy to ~30%% of a core under a storm of changes while keeping programming "
                     f"latency near {DEFAULTS.min_sync_period:g} s; with --source-file it is how often the file is checked, "
                     "default 1)")
    run.add_argument("--sync-period", type=float, default=DEFAULTS.sync_period, metavar="SECONDS",
                     help="sync at least this often even without changes (default %(default)g)")
    run.add_argument("--full-sync-period", type=float, default=DEFAULTS.full_sync_period, metavar="SECONDS",
                     help="rewrite the whole ruleset this often, healing any drift "
                     "(default %(default)g)")
    run.add_argument("--healthz-bind-address", default=DEFAULTS.healthz_bind_address, metavar="HOST:PORT",
                     help="serve /healthz and /livez here (default %(default)s; "
                     "empty to disable)")
    run.add_argument("--metrics-bind-address", default=DEFAULTS.metrics_bind_address, metavar="HOST:PORT",
                     help="serve /metrics here (default %(default)s; empty to disable)")
    run.add_argument("--watch-idle-timeout", type=float, default=DEFAULTS.watch_idle_timeout, metavar="SECONDS",
                     help="API mode: restart a watch that received nothing (not even the bookmark "
                     "the API server sends every minute) for this long: a dead connection or a "
                     "stuck proxy (default %(default)g; pyproxy's own flag)")
    run.add_argument("--retries", type=int, default=3, metavar="N",
                     help="with --once: attempts before giving up on a refused ruleset (default 3)")
    run.add_argument("--init-only", action="store_true",
                     help="set the sysctls that need full root privileges (the conntrack ones; "
                     "route_localnet with localhost NodePorts) and exit: for a privileged init "
                     "container, so that pyproxy itself runs unprivileged (exit 1 if one cannot be set)")
    ct = DEFAULTS.conntrack
    run.add_argument("--conntrack-max-per-core", type=int, default=ct.max_per_core, metavar="N",
                     help="raise nf_conntrack_max to N x CPUs (at least --conntrack-min, at most 1048576) "
                     "and the hash table to a quarter of it; never lowers them; 0 leaves them to the "
                     "host (default %(default)s)")
    run.add_argument("--conntrack-min", type=int, default=ct.min, metavar="N",
                     help="the floor of nf_conntrack_max (default %(default)s)")
    run.add_argument("--conntrack-tcp-timeout-established", type=_seconds, default=ct.tcp_established_timeout,
                     metavar="DURATION", help="idle timeout of established TCP entries, like 24h or "
                     "86400 (default 24h; 0 leaves the kernel's)")
    run.add_argument("--conntrack-tcp-timeout-close-wait", type=_seconds, default=ct.tcp_close_wait_timeout,
                     metavar="DURATION", help="timeout of TCP entries in CLOSE_WAIT (default 1h; 0 "
                     "leaves the kernel's 60 s)")
    run.add_argument("--conntrack-tcp-be-liberal", action=argparse.BooleanOptionalAction,
                     default=ct.tcp_be_liberal,
                     help="accept out-of-window TCP packets rather than mark them INVALID (default "
                     "off; when on, iptables mode adds no rule dropping INVALID packets, as upstream)")
    run.add_argument("--conntrack-udp-timeout", type=_seconds, default=ct.udp_timeout, metavar="DURATION",
                     help="timeout of unreplied UDP entries (default 0: the kernel's 30 s)")
    run.add_argument("--conntrack-udp-timeout-stream", type=_seconds, default=ct.udp_stream_timeout,
                     metavar="DURATION", help="timeout of UDP entries that saw replies (default 0: the "
                     "kernel's 120 s)")

    explain = sub.add_parser("explain", help="say what this node does with a packet, from the model")
    common(explain, api=True)
    explain.add_argument("packet", metavar="IP:PORT/PROTO", help="e.g. 10.96.0.10:80/tcp")
    explain.add_argument("--from", dest="source", metavar="SRC", help="the packet's source address")
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    cleanup = sub.add_parser("cleanup", help="remove everything pyproxy installed, in every mode")
    cleanup.add_argument("-v", "--v", dest="verbosity", type=int, default=1, metavar="N",
                         help="log verbosity: 0 warnings, 1 info (default), 2 debug")
    return parser


def _seconds(text: str) -> float:
    """A duration flag: Go's syntax (24h, 1h30m, 500ms) or plain seconds."""
    from pyproxy.kpconfig import parse_duration

    try:
        value = float(text)
    except ValueError:
        try:
            value = parse_duration(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a duration cannot be negative (0 leaves the kernel's value)")
    return value


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    if not 0 <= args.iptables_masquerade_bit <= 31:
        raise UsageError("--iptables-masquerade-bit must be between 0 and 31 (kube-proxy uses 14)")
    families = _families(args.ip_families)
    if args.proxy_mode == "userspace" and families == (6,):
        raise UsageError("userspace mode relays IPv4 only; use --ip-families 4 (or a kernel mode for IPv6)")
    return ProxyConfig(
        mode=args.proxy_mode,
        # As upstream: the node name is the host name, trimmed and lower-cased (Node names are).
        hostname=(args.hostname_override or socket.gethostname()).strip().lower(),
        cluster_cidrs=_cidr_list(args.cluster_cidr, "--cluster-cidr"),
        nodeport_addresses=_cidr_list(args.nodeport_addresses, "--nodeport-addresses",
                                      keywords=("primary",)),
        masquerade_all=args.masquerade_all,
        masquerade_bit=args.iptables_masquerade_bit,
        localhost_nodeports=args.iptables_localhost_nodeports,
        ip_families=families,
    )


def _families(text: str) -> tuple[Family, ...]:
    out: list[Family] = []
    for part in (p.strip() for p in text.split(",")):
        if part not in ("4", "6") or int(part) in out:
            raise UsageError(f"--ip-families {text!r}: give 4, 6 or 4,6")
        out.append(4 if part == "4" else 6)
    return tuple(out)



def cmd_render(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.mode == "userspace":
        raise UsageError("render shows kernel rulesets; userspace mode's redirects depend on the "
                         "ports its relays get at run time (use nftables or iptables)")
    for source in file_sources(args.source_file, config):
        fam = source.config
        state = source.load()
        if fam.family == 6 and not state.services and len(config.ip_families) > 1:
            continue  # nothing of IPv6 to show: spare the reader an empty table
        if config.mode == "iptables":
            from pyproxy.ipt.executor import FakeIptables
            from pyproxy.proxier.iptables import IptProxier

            if fam.family == 6:
                sys.stdout.write("# IPv6: ip6tables-restore input\n")
            # As a sync writes them on a kernel whose conntrack is not liberal (the default):
            # render asks no kernel anything.
            text = IptProxier(config=fam, executor=FakeIptables(family=fam.family),
                              drop_invalid=True).render_text(state)
        else:
            from pyproxy.nft.executor import FakeNft
            from pyproxy.proxier.nftables import NftProxier

            text = NftProxier(config=fam, executor=FakeNft()).render_text(state)
        sys.stdout.write(text)
    return 0


def require_capabilities(*, raw: bool = False) -> None:
    """Stop with a clear message when the kernel would refuse every rule: NET_ADMIN for nft,
    iptables and conntrack (every mode: userspace guards its relays with nft); NET_RAW too
    for the legacy iptables backend. Checked before anything asks the kernel, so the user
    reads which capability is missing instead of a backend's "Operation not permitted"."""
    from pyproxy.hostnet import missing_capabilities

    missing = missing_capabilities(("NET_ADMIN", "NET_RAW") if raw else ("NET_ADMIN",))
    if missing:
        caps = " and ".join(missing)
        raise UsageError(f"pyproxy run needs the {caps} capabilit{'ies' if len(missing) > 1 else 'y'}, "
                         f"and this process does not have {'them' if len(missing) > 1 else 'it'}: in "
                         f"Kubernetes add {caps} to the container's securityContext.capabilities.add "
                         "(the chart does); on a host, run as root")


def cmd_run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.init_only:
        return _init_only(args, config)
    require_capabilities()
    if args.source_file and args.once:
        return _run_once(args, config)
    return _run_daemon(args, config)


def _settings(args: argparse.Namespace, backend: BackendChoice) -> Settings:
    """The daemon's settings from the command line (and config file, merged into ``args``)."""
    default_min_sync = FILE_MIN_SYNC_PERIOD if args.source_file else DEFAULTS.min_sync_period
    return Settings(
        kubeconfig=args.kubeconfig,
        source_file=args.source_file,
        iptables_backend=backend,
        min_sync_period=default_min_sync if args.min_sync_period is None else args.min_sync_period,
        sync_period=args.sync_period,
        full_sync_period=args.full_sync_period,
        healthz_bind_address=args.healthz_bind_address,
        metrics_bind_address=args.metrics_bind_address,
        watch_idle_timeout=args.watch_idle_timeout,
        conntrack=_conntrack(args),
    )


def _conntrack(args: argparse.Namespace) -> ConntrackSettings:
    return ConntrackSettings(
        max_per_core=args.conntrack_max_per_core, min=args.conntrack_min,
        tcp_established_timeout=args.conntrack_tcp_timeout_established,
        tcp_close_wait_timeout=args.conntrack_tcp_timeout_close_wait,
        tcp_be_liberal=args.conntrack_tcp_be_liberal, udp_timeout=args.conntrack_udp_timeout,
        udp_stream_timeout=args.conntrack_udp_timeout_stream)


def _init_only(args: argparse.Namespace, config: ProxyConfig) -> int:
    """``--init-only``: the privileged part of the start, then exit (upstream's flag)."""
    from pyproxy import sysctls

    writes = sysctls.wanted(_conntrack(args), cpus=sysctls.cpu_count())
    if config.localhost_nodeports_active:
        writes.append(sysctls.ROUTE_LOCALNET)
    problems = sysctls.apply(writes)
    for p in problems:
        print(f"pyproxy: {p}", file=sys.stderr)
    if problems:
        print("pyproxy: --init-only needs root with a writable /proc/sys in the host's network "
              "namespace (a privileged container with hostNetwork); or set the flags named above "
              "to leave those values to the host", file=sys.stderr)
        return 1
    log.info("init-only: sysctls in place")
    return 0


def _run_once(args: argparse.Namespace, config: ProxyConfig) -> int:
    """``--once``: one pass of the daemon's sync loop over the file (with retries), other
    modes' rules then removed."""
    import asyncio

    from pyproxy.daemon import apply_once

    if config.mode == "userspace":
        raise UsageError("--once cannot work in userspace mode: the relays live in the pyproxy "
                         "process; run without --once")
    backend = resolve_backend(config, args.iptables_backend)
    require_capabilities(raw=backend == "legacy")
    if asyncio.run(apply_once(config, _settings(args, backend), attempts=max(1, args.retries),
                              make_proxier=make_proxier)):
        return 0
    print("pyproxy: the kernel refused the ruleset; the previous rules are still in place. "
          "Run 'pyproxy render' with the same flags to see the ruleset, and check that "
          "nft/iptables work here (are you root?).", file=sys.stderr)
    return 1


def _run_daemon(args: argparse.Namespace, config: ProxyConfig) -> int:
    """Keep the kernel in sync with the API (production) or with a file, until stopped: one
    sync loop, the same health, metrics, conntrack cleanup and health check node ports."""
    import asyncio
    import os

    from pyproxy.daemon import serve

    if not args.source_file and not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise UsageError("give --kubeconfig FILE or --source-file FILE (or run in a pod, where "
                         "KUBERNETES_SERVICE_HOST and the service account token are set)")
    if args.once:
        raise UsageError("--once works with --source-file; with the API pyproxy keeps running")
    backend = resolve_backend(config, args.iptables_backend)
    require_capabilities(raw=backend == "legacy")
    from pyproxy import sysctls

    settings = _settings(args, backend)
    # As kube-proxy at start; a value it cannot write is a warning (see pyproxy.sysctls).
    sysctls.apply(sysctls.wanted(settings.conntrack, cpus=sysctls.cpu_count()))
    code = 0
    try:
        code = asyncio.run(serve(config, settings, make_proxier=make_proxier))
    except KeyboardInterrupt:
        pass
    log.info("stopped; rules stay in place (use 'pyproxy cleanup' to remove them)")
    return code


def _write_config(args: argparse.Namespace) -> int:
    import yaml

    from pyproxy.kpconfig import from_settings

    text = yaml.safe_dump(from_settings(vars(args)), sort_keys=False)
    if args.write_config_to == "-":
        sys.stdout.write(text)
    else:
        with open(args.write_config_to, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from pyproxy.explain import explain, render_text
    from pyproxy.model.ipaddr import canonical_ip

    addr, _, proto = args.packet.partition("/")
    ip, _, port = addr.rpartition(":")
    try:
        ip, family = canonical_ip(ip.strip("[]"))
        port_n = int(port)
        if not 1 <= port_n <= 65535 or proto.lower() not in ("tcp", "udp", "sctp"):
            raise ValueError
    except (ValueError, BadAddress):
        raise UsageError(f"{args.packet!r}: write the packet as IP:PORT/PROTO, e.g. 10.96.0.10:80/tcp "
                         "or [fd00::10]:80/tcp") from None
    config = config_from_args(args).for_family(family)
    if args.source_file:
        state = FileSource(args.source_file, config).load()
    else:
        state = api_snapshot(args.kubeconfig, config)
    e = explain(state, config, dst=ip, port=port_n, proto=proto, src=args.source)
    print(json.dumps(e.as_dict(), indent=1) if args.json else render_text(e, packet=args.packet
          + (f" from {args.source}" if args.source else "")))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from pyproxy.cleanup import cleanup_all

    removed = cleanup_all()
    log.info("cleanup done: %s", ", ".join(removed) if removed else "nothing of pyproxy was installed")
    return 0


def _subcommand_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The long flags (without dashes) that ``command`` accepts."""
    for action in parser._actions:  # noqa: SLF001 - argparse lists subparsers nowhere else
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:  # noqa: SLF001
            return {o[2:] for a in action.choices[command]._actions for o in a.option_strings  # noqa: SLF001
                    if o.startswith("--")}
    return set()


def expand_config(argv: list[str], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Replace ``--config FILE`` by the flags it holds, placed first so command-line flags win.

    The file is a YAML mapping of long flag names (without dashes) to values, e.g.
    ``proxy-mode: iptables``; ``true`` turns a switch on, ``false`` or empty leaves it off.
    A KubeProxyConfiguration holds ``run``'s settings: with ``parser``, the fields of flags the
    subcommand does not have (``render`` has no sync periods) are left out, not refused.
    """
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2):]
            break
    else:
        return argv
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"--config {path}: {err}; give a readable YAML file of flag: value pairs") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, like 'proxy-mode: iptables'")
    if data.get("kind") == "KubeProxyConfiguration":
        from pyproxy.kpconfig import to_flags

        try:
            data, ignored = to_flags(data)
        except ValueError as err:
            raise UsageError(f"--config {path}: {err}") from None
        if ignored:
            print(f"pyproxy: --config {path}: ignoring fields pyproxy does not use: {', '.join(ignored)}",
                  file=sys.stderr)
        if parser is not None and rest[:1]:
            accepted = _subcommand_flags(parser, rest[0])
            data = {k: v for k, v in data.items() if k in accepted}
    flags: list[str] = []
    for key, value in data.items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else []
        elif value is not None and value != "":
            flags += [f"--{key}", str(value)]
    # After the subcommand name, before the user's own flags.
    return rest[:1] + flags + rest[1:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        raw = expand_config(raw, parser)
    except UsageError as err:
        print(f"pyproxy: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(raw)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\npyproxy: give a command, e.g. 'pyproxy render --source-file examples/demo.yaml'",
              file=sys.stderr)
        return 2
    _setup_logging(args.verbosity)
    gcpolicy.configure()
    if getattr(args, "write_config_to", None):
        return _write_config(args)
    try:
        return {"render": cmd_render, "run": cmd_run, "cleanup": cmd_cleanup,
                "explain": cmd_explain}[args.command](args)
    except (UsageError, SetupError, SourceError, KubeError) as err:
        print(f"pyproxy: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:
        print(f"pyproxy: {err}; programming the kernel needs root (or CAP_NET_ADMIN)", file=sys.stderr)
        return 1
    except IptablesError as err:
        # Before any sync: choosing the iptables backend found no usable iptables (the
        # message says what to install); no traceback for that.
        print(f"pyproxy: {err}", file=sys.stderr)
        return 1
    except SyncFailed as err:
        print(f"pyproxy: {err}; this is a bug in pyproxy, please report it with the input",
              file=sys.stderr)
        return 1
