"""The API-watching daemon: reflectors → store → sync loop, plus the health and metrics servers."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable
from typing import Any

from pyproxy.config import ProxyConfig
from pyproxy.health import AllHealthy, ProxyHealth, health_app, metrics_app, start_site
from pyproxy.model.objects import DesiredState
from pyproxy.problems import ProblemLog
from pyproxy.proxier.base import Proxier
from pyproxy.runner import Periods, SyncRunner
from pyproxy.service_health import HealthCheckServer, health_checks
from pyproxy.settings import Settings
from pyproxy.sources.file import SourceError, follow_file
from pyproxy.sources.kube import ENDPOINT_SLICES, SERVICES, KubeClient, Reflector, node_resource, wait_synced

log = logging.getLogger("pyproxy.daemon")


def families_of(kind: str, obj: dict[str, Any], families: list[int]) -> list[int]:
    """The IP families whose runner gets ``obj``. An EndpointSlice holds one family's addresses
    (its immutable ``addressType``): it goes to that family's runner alone, as upstream's
    metaproxier routes it. The other runner would only skip it, and counting it there too made
    one IPv4 slice change add 2 to kubeproxy_sync_proxy_rules_endpoint_changes_total on a
    dual-stack node. Everything else, and slices without a valid addressType (each runner
    reports those as invalid, once, through the shared problem log), goes to every family."""
    if kind == "EndpointSlice":
        fam = {"IPv4": 4, "IPv6": 6}.get(obj.get("addressType"))  # type: ignore[arg-type]
        if fam in families:
            return [fam]
    return families


async def serve(config: ProxyConfig, settings: Settings, *,
                make_proxier: Callable[..., Proxier]) -> int:
    """Run until SIGTERM or SIGINT (0), or until a reflector or sync loop ends, which they only
    do on a bug (1: the pod restarts and says why). Rules stay in the kernel afterwards.

    Dual-stack: one proxier, store and sync loop per family, fed by the same reflectors, so a
    family whose sync fails retries on its own while the other keeps syncing."""
    from pyproxy.cleanup import cleanup_other_modes
    from pyproxy.hostnet import interface_ips

    configs = config.family_configs()
    proxiers = [make_proxier(c, iptables_backend=settings.iptables_backend) for c in configs]
    # Another mode's rules (a switch from iptables to nftables, or from upstream kube-proxy)
    # are removed once every family's own rules are in, not at start-up: until the first sync
    # (caches listed, ruleset applied: seconds) the old rules keep serving, so a mode switch
    # drops no connection. Both rule sets send a Service to the same endpoints meanwhile.
    first_synced = [asyncio.Event() for _ in configs]

    async def clean_other_modes() -> None:
        await asyncio.gather(*(e.wait() for e in first_synced))
        await asyncio.to_thread(cleanup_other_modes, mode=config.mode,
                                iptables_backend=proxiers[0].iptables_backend)
    healths = [ProxyHealth(timeout=2 * settings.sync_period) for _ in configs]
    health = AllHealthy(healths)
    runners: list[SyncRunner] = []
    checks: list[HealthCheckServer] = []
    problems = ProblemLog()  # shared: each invalid object is logged and counted once
    for fam, proxier, fam_health, synced_once in zip(configs, proxiers, healths, first_synced):
        server = HealthCheckServer(proxy_healthy=fam_health.healthy, family=fam.family)
        checks.append(server)

        async def follow_checks(state: DesiredState, server: HealthCheckServer = server,
                                synced_once: asyncio.Event = synced_once) -> None:
            synced_once.set()
            await server.update(health_checks(state), state.nodeport_ips)

        runners.append(SyncRunner(
            proxier=proxier, config=fam, health=fam_health, clean_conntrack=True, on_synced=follow_checks,
            problems=problems,
            read_interface_ips=functools.partial(interface_ips, fam.family),
            periods=Periods(min_sync=settings.min_sync_period, sync=settings.sync_period,
                            full_sync=settings.full_sync_period),
        ))

    families = [c.family for c in configs]

    def on_replace(kind: str, objects: list[dict[str, Any]]) -> None:
        for fam, r in zip(families, runners):
            r.on_replace(kind, [o for o in objects if fam in families_of(kind, o, families)])

    def on_event(event: str, kind: str, obj: dict[str, Any]) -> None:
        for fam, r in zip(families, runners):
            if fam in families_of(kind, obj, families):
                r.on_event(event, kind, obj)

    # The source: the API's reflectors, or a file; either feeds the same runners.
    client: KubeClient | None = None
    if settings.source_file:
        loaded = asyncio.Event()
        feeders = {"file": follow_file(settings.source_file, period=settings.min_sync_period,
                                       on_replace=on_replace, loaded=loaded)}
        synced: asyncio.Future[Any] = asyncio.ensure_future(loaded.wait())
        source = settings.source_file
    else:
        client = await KubeClient.from_config(kubeconfig=settings.kubeconfig)
        reflectors = [
            Reflector(client, resource, on_replace=on_replace, on_event=on_event,
                      idle_timeout=settings.watch_idle_timeout)
            for resource in (SERVICES, ENDPOINT_SLICES, node_resource(config.hostname))
        ]
        feeders = {f"reflector-{r.resource.kind}": r.run() for r in reflectors}
        synced = asyncio.ensure_future(wait_synced(reflectors))
        source = "the API"
    sites = []
    if settings.healthz_bind_address:
        sites.append(await start_site(health_app(health), settings.healthz_bind_address))
    if settings.metrics_bind_address:
        sites.append(await start_site(metrics_app(config.mode), settings.metrics_bind_address))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(feed, name=name) for name, feed in feeders.items()]
    for fam, runner in zip(configs, runners):
        tasks.append(asyncio.create_task(runner.run(synced), name=f"sync-loop-ipv{fam.family}"))
    cleaner = asyncio.create_task(clean_other_modes()) if settings.clean_other_modes else None
    log.info("following %s as node %s in %s mode", source, config.hostname, config.mode)
    done_waiter = asyncio.ensure_future(stop.wait())
    finished, _ = await asyncio.wait([done_waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    unreadable: SourceError | None = None
    for task in finished:
        if task is not done_waiter:
            code = 1
            err = task.exception()
            if isinstance(err, SourceError):  # the file could not be read at start
                unreadable = err
                continue
            log.error("%s stopped (a bug: it should run forever); exiting so that the pod restarts",
                      task.get_name(), exc_info=err)
    for task in tasks:
        task.cancel()
    if cleaner is not None:
        cleaner.cancel()
        await asyncio.gather(cleaner, return_exceptions=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    for site in sites:
        await site.cleanup()
    for server in checks:
        await server.close()
    synced.cancel()
    if client is not None:
        await client.close()
    if unreadable is not None:
        raise unreadable  # the command says what to fix
    return code
