"""The API-watching daemon: reflectors → store → sync loop, plus the health and metrics servers."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pyproxy.config import ProxyConfig
from pyproxy.health import AllHealthy, ProxyHealth, health_app, metrics_app, start_site
from pyproxy.model.objects import DesiredState
from pyproxy.problems import ProblemLog
from pyproxy.proxier.base import Proxier
from pyproxy.runner import FamilyRunners, Periods, SyncRunner
from pyproxy.settings import Settings
from pyproxy.sources.file import SourceError, follow_file

if TYPE_CHECKING:
    from pyproxy.service_health import HealthCheckServer
    from pyproxy.sources.kube import KubeClient

log = logging.getLogger("pyproxy.daemon")


def _runner(config: ProxyConfig, proxier: Proxier, settings: Settings, *, health: ProxyHealth,
            problems: ProblemLog,
            on_synced: Callable[[DesiredState], Awaitable[None]] | None = None) -> SyncRunner:
    """One family's sync loop, as the daemon and ``run --once`` both run it."""
    from pyproxy.hostnet import interface_ips

    return SyncRunner(
        proxier=proxier, config=config, health=health, clean_conntrack=True, on_synced=on_synced,
        problems=problems, read_interface_ips=functools.partial(interface_ips, config.family),
        periods=Periods(min_sync=settings.min_sync_period, sync=settings.sync_period,
                        full_sync=settings.full_sync_period))


async def apply_once(config: ProxyConfig, settings: Settings, *, attempts: int,
                     make_proxier: Callable[..., Proxier]) -> bool:
    """``run --once``: the source file read once and each family's rules applied by one pass
    of the same sync loop the daemon runs (retried when the kernel refuses); then, if every
    family's rules are in, other modes' rules removed. Whether every family succeeded."""
    from pyproxy.cleanup import cleanup_other_modes
    from pyproxy.model.store import by_kind
    from pyproxy.sources.file import load_objects

    assert settings.source_file, "run --once reads a source file"
    configs = config.family_configs()
    proxiers = [make_proxier(c, iptables_backend=settings.iptables_backend) for c in configs]
    problems = ProblemLog()
    fan = FamilyRunners([_runner(c, p, settings, health=ProxyHealth(timeout=2 * settings.sync_period),
                                 problems=problems) for c, p in zip(configs, proxiers)])
    objects = await asyncio.to_thread(load_objects, settings.source_file)
    for kind, of_kind in by_kind(objects).items():
        fan.on_replace(kind, of_kind)
    # Every family is tried, whatever another one did: they are independent.
    ok = [await runner.sync_once(attempts=attempts) for runner in fan.runners]
    if all(ok) and settings.clean_other_modes:
        await asyncio.to_thread(cleanup_other_modes, mode=config.mode,
                                iptables_backend=proxiers[0].iptables_backend)
    return all(ok)


async def serve(config: ProxyConfig, settings: Settings, *,
                make_proxier: Callable[..., Proxier]) -> int:
    """Run until SIGTERM or SIGINT (0), or until a reflector or sync loop ends, which they only
    do on a bug (1: the pod restarts and says why). Rules stay in the kernel afterwards.

    Dual-stack: one proxier, store and sync loop per family, fed by the same reflectors, so a
    family whose sync fails retries on its own while the other keeps syncing."""
    # Here, not at the top: ``run --once`` imports this module too, and needs neither the API
    # client nor the health check servers (aiohttp).
    from pyproxy.cleanup import cleanup_other_modes
    from pyproxy.service_health import HealthCheckServer, health_checks
    from pyproxy.sources.kube import ENDPOINT_SLICES, SERVICES, KubeClient, Reflector, node_resource, wait_synced

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

        runners.append(_runner(fam, proxier, settings, health=fam_health, problems=problems,
                               on_synced=follow_checks))

    fan = FamilyRunners(runners)
    on_replace, on_event = fan.on_replace, fan.on_event

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
