"""One-time desired states, for the commands that do not follow a source: ``render``,
``explain`` and ``run --once`` (from a file), ``explain`` (one listing of the API, as the
daemon's reflectors would list)."""

from __future__ import annotations

import logging

from pyproxy.config import ProxyConfig
from pyproxy.model.objects import DesiredState
from pyproxy.model.state import StateBuilder
from pyproxy.problems import ProblemLog
from pyproxy.settings import SetupError
from pyproxy.sources.file import load_objects

log = logging.getLogger("pyproxy")


class FileSource:
    """One family's desired state from a source file (render, explain, run --once; the daemon
    follows a file with sources.file.follow_file instead)."""

    def __init__(self, path: str, config: ProxyConfig, *, problems: ProblemLog | None = None) -> None:
        self.path = path
        self.config = config
        self.builder = StateBuilder(node_name=config.hostname, family=config.family)
        self.problems = problems if problems is not None else ProblemLog()
        """Shared by the families' sources: each invalid object is logged and counted once."""

    def load(self) -> DesiredState:
        objects = load_objects(self.path)
        self.builder.replace_all(objects)
        from pyproxy.hostnet import interface_ips

        state = self.builder.build_for_node(cidrs=self.config.nodeport_addresses,
                                            interfaces=lambda: interface_ips(self.config.family))
        self._report(state)
        return state

    def _report(self, state: DesiredState) -> None:
        self.problems.report(self.config.family, state.problems)
        for skip in self.builder.skips:
            log.debug("not proxying %s %s/%s: %s", skip.kind, *skip.key, skip.reason)


def file_sources(path: str, config: ProxyConfig) -> list[FileSource]:
    """One source per family, sharing which problems were logged."""
    problems = ProblemLog()
    return [FileSource(path, c, problems=problems) for c in config.family_configs()]


def api_snapshot(kubeconfig: str | None, config: ProxyConfig) -> DesiredState:
    """List (once) what the daemon would watch, and build the state from it."""
    import asyncio
    import os

    from pyproxy.sources.kube import (
        ENDPOINT_SLICES,
        SERVICES,
        KubeClient,
        Reflector,
        node_resource,
    )

    builder = StateBuilder(node_name=config.hostname, family=config.family)

    async def snap() -> None:
        client = await KubeClient.from_config(kubeconfig=kubeconfig)
        try:
            for res in (SERVICES, ENDPOINT_SLICES, node_resource(config.hostname)):
                await Reflector(client, res, on_replace=builder.replace, on_event=lambda *a: None).list_all()
        finally:
            await client.close()

    if not kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise SetupError("give --source-file FILE or --kubeconfig FILE")
    asyncio.run(snap())
    from pyproxy.hostnet import interface_ips

    return builder.build_for_node(cidrs=config.nodeport_addresses,
                                  interfaces=lambda: interface_ips(config.family))
