"""The lab's stand-in for the kubelet: runs the Pods bound to one node.

It watches Pods with ``spec.nodeName`` = its node. For each new Pod it starts the echo backend
under ``unshare --net`` (a fresh network namespace owned by that process, as a container
runtime would make), moves one end of a veth pair into it, plugs the other into the node's
pod bridge, and reports ``podIP`` and ``Ready`` through the status subresource, which is what
the EndpointSlice controller reads. A Pod being deleted keeps serving for its grace period
(so its endpoint shows as terminating), then its process is stopped and the Pod is removed.

Runs inside the node's network namespace:
``ip netns exec NODE python -m lab.kubelet --kubeconfig K --node NAME --pod-cidr C``.
Unlike pyproxy, this program writes to the API (it plays the kubelet).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from pyproxy.sources.kube import KubeClient, KubeError, Reflector, Resource

log = logging.getLogger("lab.kubelet")
MAX_GRACE = 2.0  # seconds a deleted Pod keeps serving, at most (keeps tests quick)


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    ip: str
    host_if: str
    proc: subprocess.Popen[str]


class LabClient(KubeClient):
    """The kubelet may write: Pod status, and the final delete of a terminated Pod."""

    async def send(self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
                   content_type: str = "application/merge-patch+json") -> int:
        data = json.dumps(body).encode() if body is not None else None
        headers = {**await self._auth_headers(), "Content-Type": content_type}
        async with self._sess().request(method, self.host + path, params=params or {}, data=data,
                                        headers=headers) as resp:
            await resp.read()
            return resp.status


class Kubelet:
    def __init__(self, *, client: LabClient, node: str, pod_cidr: str, bridge: str, state_dir: Path) -> None:
        self.client = client
        self.node = node
        # "v4[,v6]": a dual-stack pod gets the same host number in each family's CIDR.
        nets = [ipaddress.ip_network(c) for c in pod_cidr.split(",")]
        net = nets[0]
        self.gateway = str(net.network_address + 1)
        self.prefix = net.prefixlen
        self.net6 = next((n for n in nets if n.version == 6), None)
        self.free = [str(net.network_address + i) for i in range(10, min(net.num_addresses - 1, 250))]
        self.bridge = bridge
        self.state_dir = state_dir / "pods"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pods: dict[str, PodRun] = {}
        self.starting: set[str] = set()
        self.stopping: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- reflector callbacks -----------------------------------------------------------
    def on_replace(self, kind: str, pods: list[dict[str, Any]]) -> None:
        live = {p["metadata"]["uid"] for p in pods}
        for uid in list(self.pods):
            if uid not in live:
                self._stop(uid)
        for pod in pods:
            self._reconcile(pod)

    def on_event(self, event: str, kind: str, pod: dict[str, Any]) -> None:
        if event == "DELETED":
            self._stop(pod["metadata"]["uid"])
        else:
            self._reconcile(pod)

    def _reconcile(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp"):
            if uid not in self.stopping:
                self.stopping.add(uid)
                grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), MAX_GRACE)
                self._spawn(self._terminate(pod, grace))
            return
        if uid not in self.pods and uid not in self.starting:
            self.starting.add(uid)
            self._spawn(self._start(pod))

    # -- pod lifecycle -----------------------------------------------------------------
    async def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        try:
            ip = self.free.pop(0)
            ports: list[int] = []
            http_ports: list[int] = []
            for c in pod["spec"].get("containers", []):
                for p in c.get("ports") or []:
                    (http_ports if p.get("name", "").startswith("http") else ports).append(p["containerPort"])
            if not ports:
                ports = [8080]
            argv = ["unshare", "--net", sys.executable, "-m", "lab.echo", "--name", name,
                    "--address", f"{ip}/{self.prefix}", "--gateway", self.gateway]
            ip6 = ""
            if self.net6 is not None:
                host = int(ipaddress.ip_address(ip)) & 0xFF
                ip6 = str(self.net6.network_address + host)
                argv += ["--address6", f"{ip6}/{self.net6.prefixlen}",
                         "--gateway6", str(self.net6.network_address + 1)]
            argv += [a for p in ports for a in ("--port", str(p))]
            argv += [a for p in http_ports for a in ("--http-port", str(p))]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
            host_if = "vp" + hashlib.sha1(uid.encode()).hexdigest()[:11]
            # pyroute2's synchronous API runs its own event loop: keep it off ours.
            await asyncio.to_thread(self._plug, host_if, proc.pid)
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"echo for {ns}/{name} did not start")
            run = PodRun(uid, ns, name, ip, host_if, proc)
            self.pods[uid] = run
            (self.state_dir / f"{ns}_{name}.json").write_text(json.dumps({"pid": proc.pid, "ip": ip, "uid": uid}))
            now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            cond = [{"type": t, "status": "True", "lastTransitionTime": now}
                    for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
            pod_ips = [{"ip": ip}, *([{"ip": ip6}] if ip6 else [])]
            status = {"status": {"phase": "Running", "podIP": ip, "podIPs": pod_ips, "startTime": now,
                                 "conditions": cond}}
            code = await self.client.send("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", body=status)
            log.info("pod %s/%s running at %s (status patch: %s)", ns, name, ip, code)
        except Exception as err:  # noqa: BLE001 - one pod must not stop the others
            log.error("pod %s/%s failed to start: %s", ns, name, err)
        finally:
            self.starting.discard(uid)

    def _plug(self, host_if: str, pid: int) -> None:
        """veth: eth0 into the pod's namespace, the other end into the node's pod bridge."""
        with IPRoute() as ipr:
            for _ in range(200):  # until unshare has made the namespace
                try:
                    ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_pid": pid})
                    break
                except Exception:  # noqa: BLE001 - the namespace is not there yet
                    time.sleep(0.02)
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=self.bridge)[0], state="up")
        # Hairpin, as the bridge CNI sets it: a pod reaching itself through its Service.
        subprocess.run(["ip", "link", "set", "dev", host_if, "type", "bridge_slave", "hairpin", "on"],
                       check=False, capture_output=True)

    async def _terminate(self, pod: dict[str, Any], grace: float) -> None:
        meta = pod["metadata"]
        await asyncio.sleep(grace)
        self._stop(meta["uid"])
        try:
            await self.client.send("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                   body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                                   content_type="application/json")
        except KubeError as err:
            log.warning("final delete of %s/%s: %s", meta["namespace"], meta["name"], err)

    def _stop(self, uid: str) -> None:
        run = self.pods.pop(uid, None)
        if run is None:
            return
        if run.proc.poll() is None:
            run.proc.terminate()
            try:
                run.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                run.proc.kill()
        if run.proc.stdout:
            run.proc.stdout.close()
        # The pod's namespace died with its process, and the veth pair with it.
        self.free.append(run.ip)
        (self.state_dir / f"{run.namespace}_{run.name}.json").unlink(missing_ok=True)
        log.info("pod %s/%s stopped", run.namespace, run.name)

    def stop_all(self) -> None:
        for uid in list(self.pods):
            self._stop(uid)


async def amain(args: argparse.Namespace) -> None:
    client = await LabClient.from_config(kubeconfig=args.kubeconfig)
    kubelet = Kubelet(client=client, node=args.node, pod_cidr=args.pod_cidr, bridge=args.bridge,
                      state_dir=Path(args.state_dir))
    reflector = Reflector(client, Resource("Pod", "/api/v1/pods", field_selector=f"spec.nodeName={args.node}"),
                          on_replace=kubelet.on_replace, on_event=kubelet.on_event)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(reflector.run())
    await stop.wait()
    task.cancel()
    kubelet.stop_all()
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--pod-cidr", required=True)
    parser.add_argument("--bridge", default="cbr0")
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(amain(args))
    time.sleep(0)


if __name__ == "__main__":
    main()
