"""A real lab node: containerd and the real kubelet inside the node's network namespace.

Both are started with ``nsenter --net=/run/netns/NODE``, not ``ip netns exec``: the latter
also unshares the mount namespace and remounts /sys, and the kubelet and containerd must see
the same mounts (the kubelet's volume directories are bind-mounted into containers by
containerd). A ``hostNetwork`` pod then shares the node's network namespace, as on a real node:
pyproxy's DaemonSet pod programs the node's own nftables or iptables.

Per node, under ``/var/lib/pyproxy-lab/<tag>-n<i>``: containerd's root, state, sockets and runc
root; the kubelet's root dir, pod logs, client certificate (``system:node:<name>``, group
``system:nodes``: the API server's Node authorizer and NodeRestriction admission check it); the
CNI configuration (bridge ``cbr0`` with host-local IPAM on the node's podCIDRs, both families).

cgroups. This host has the v1 (hybrid) hierarchy, which kubelet 1.37 refuses unless
``failCgroupV1: false``. The kubelet uses the ``cgroupfs`` driver (PID 1 is not systemd) with
``cgroupsPerQOS: false`` and no node-allocatable enforcement: the lab's nodes share one machine,
so per-node QoS trees would only repeat the host's limits. With QoS cgroups off the kubelet
passes no cgroup parent (its ``cgroupRoot`` is not handed down), and containerd puts every
container at ``/k8s.io/<container id>`` in each hierarchy, all nodes alike. Teardown is still
exact: a node's container ids are the task bundles in its own containerd state directory, so
it kills what is in those cgroups and removes them, and nothing of another node is touched.

This host withholds CAP_SYS_RESOURCE from root: runc cannot lower a container's oom_score_adj
below its parent's, so containerd's CRI runtime has ``restrict_oom_score_adj = true``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NODE_ROOT = Path(os.environ.get("PYPROXY_LAB_NODE_DIR", "/var/lib/pyproxy-lab"))
PAUSE_IMAGE = "docker.io/library/pause:lab"
CGROUPS = Path("/sys/fs/cgroup")
CGROUP_PARENT = "k8s.io"
"""Where containerd puts a container's cgroup when the kubelet passes no parent."""


@dataclass(frozen=True)
class RealNode:
    """Paths and configuration of one real node; the processes are the lab's to start."""

    name: str
    """The Node's name (``node-1``): the kubelet's --hostname-override and certificate CN."""
    netns: str
    """The node's network namespace (``/run/netns/<netns>``)."""
    dir: str
    """Everything of this node on disk: containerd, kubelet, CNI, certificates."""
    bin_dir: str
    """lab/build-node.sh's output: kubelet, containerd, runc, shim, ctr; CNI plugins in cni/."""
    node_ips: tuple[str, ...]
    """The node's addresses (IPv4 first), the kubelet's --node-ip."""
    pod_cidrs: tuple[str, ...]
    """The node's podCIDRs (IPv4 first), which host-local allocates pod addresses from."""
    cluster_dns: tuple[str, ...] = ()
    """The kubelet's clusterDNS (pods' nameserver); empty: pods get the host's resolv.conf."""

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def sock(self) -> str:
        return str(self.path / "containerd.sock")

    @property
    def nsenter(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

    def env(self) -> dict[str, str]:
        """containerd finds the runc shim and runc on PATH."""
        return {**os.environ, "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}

    # -- configuration ---------------------------------------------------------------------
    def write_config(self, *, kubeconfig: str) -> None:
        d = self.path
        for sub in ("cni", "kubelet", "pod-logs", "ipam"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "containerd.toml").write_text(self.containerd_config())
        (d / "cni" / "10-lab.conflist").write_text(json.dumps(self.cni_config(), indent=1))
        (d / "kubelet.yaml").write_text(json.dumps(self.kubelet_config(), indent=1))
        (d / "kubelet.kubeconfig").write_text(kubeconfig)

    def containerd_config(self) -> str:
        d = self.dir
        cri_runtime = "plugins.'io.containerd.cri.v1.runtime'"
        return f"""version = 3
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{d}/containerd-ttrpc.sock"
# NRI's socket has one fixed path on the host: two nodes' containerds would fight over it.
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
[{cri_runtime}]
  restrict_oom_score_adj = true
  # Pod network namespaces under this node's state dir, not in /run/netns beside the lab's.
  netns_mounts_under_state_dir = true
  [{cri_runtime}.cni]
    bin_dirs = ["{self.bin_dir}/cni"]
    conf_dir = "{d}/cni"
    max_conf_num = 1
  [{cri_runtime}.containerd]
    default_runtime_name = "runc"
    [{cri_runtime}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri_runtime}.containerd.runtimes.runc.options]
        BinaryName = "{self.bin_dir}/runc"
        Root = "{d}/runc"
        SystemdCgroup = false
"""

    def cni_config(self) -> dict[str, object]:
        """The bridge the lab's host-gw routes lead to: ``cbr0`` holds the gateway of each
        podCIDR; no masquerade (pod traffic leaves with the pod's own address, and what must
        be masqueraded is the proxy's decision); hairpin so a pod reaches itself through a
        Service. Then portmap, for pods' ``hostPort`` (as kind's CNI chain has it; upstream's
        CLOSE_WAIT spec serves on one)."""
        ranges = [[{"subnet": c, "gateway": _first_host(c)}] for c in self.pod_cidrs]
        routes = [{"dst": "0.0.0.0/0" if ":" not in c else "::/0"} for c in self.pod_cidrs]
        return {"cniVersion": "1.0.0", "name": "lab", "plugins": [
            {"type": "bridge", "bridge": "cbr0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": ranges, "routes": routes, "dataDir": f"{self.dir}/ipam"}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}

    def kubelet_config(self) -> dict[str, object]:
        sock = f"unix://{self.sock}"
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [], "failSwapOn": False,
            "containerRuntimeEndpoint": sock, "imageServiceEndpoint": sock,
            "podLogsDir": f"{self.dir}/pod-logs", "volumePluginDir": f"{self.dir}/kubelet/volume-plugins",
            # The API server reaches the kubelet for logs and exec from the lab's control plane
            # only (its own namespaces), so the kubelet lets it in without credentials.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "readOnlyPort": 0, "serializeImagePulls": False,
            # One disk under every node: the host's fill level is not a node's pressure.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "syncFrequency": "10s", "fileCheckFrequency": "1h", "resolvConf": "/etc/resolv.conf",
            **({"clusterDNS": list(self.cluster_dns), "clusterDomain": "cluster.local"} if self.cluster_dns else {}),
        }

    def kubelet_argv(self) -> list[str]:
        return [f"{self.bin_dir}/kubelet", f"--config={self.dir}/kubelet.yaml",
                f"--kubeconfig={self.dir}/kubelet.kubeconfig", f"--hostname-override={self.name}",
                f"--node-ip={','.join(self.node_ips)}", f"--root-dir={self.dir}/kubelet",
                f"--cert-dir={self.dir}/kubelet/pki", "--v=1"]

    def containerd_argv(self) -> list[str]:
        return [f"{self.bin_dir}/containerd", "--config", f"{self.dir}/containerd.toml"]

    # -- using it -------------------------------------------------------------------------
    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([f"{self.bin_dir}/ctr", "-a", self.sock, "-n", "k8s.io", *args], capture_output=True,
                              text=True, timeout=timeout, env=self.env(), check=False)

    def import_image(self, archive: Path) -> None:
        got = self.ctr("images", "import", "--no-unpack", str(archive))
        if got.returncode != 0:
            raise RuntimeError(f"{self.name}: ctr images import {archive}: {got.stderr.strip()}")

    def running_container(self, pod: str, namespace: str, container: str) -> tuple[str, int]:
        """Id and PID of a running container of a pod on this node (enter it with nsenter -t PID)."""
        got = self.ctr("containers", "ls", "-q", f'labels."io.kubernetes.pod.name"=={pod},'
                       f'labels."io.kubernetes.pod.namespace"=={namespace},'
                       f'labels."io.kubernetes.container.name"=={container}')
        tasks = [line.split() for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]]
        for cid in got.stdout.split():
            for parts in tasks:
                if parts and parts[0] == cid and parts[2] == "RUNNING":
                    return cid, int(parts[1])
        raise LookupError(f"no running container {container} of pod {namespace}/{pod} on {self.name}")

    def container_pid(self, pod: str, namespace: str, container: str) -> int:
        return self.running_container(pod, namespace, container)[1]

    def kill_container(self, pod: str, namespace: str, container: str) -> None:
        """SIGKILL a pod's container through the runtime (``ctr tasks kill``), as a crash would
        end it; the kubelet then restarts it."""
        cid, _ = self.running_container(pod, namespace, container)
        got = self.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
        if got.returncode != 0:
            raise RuntimeError(f"{self.name}: ctr tasks kill {cid}: {got.stderr.strip()}")

    # -- teardown -------------------------------------------------------------------------
    def container_ids(self) -> list[str]:
        """Every container (pause sandboxes too) this node's containerd has a task bundle for;
        read from disk, so it works when containerd is gone."""
        tasks = self.path / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
        return sorted(p.name for p in tasks.iterdir()) if tasks.is_dir() else []

    def cgroup_dirs(self) -> list[Path]:
        """This node's container cgroups, in every hierarchy that holds them."""
        ids = self.container_ids()
        return [d for h in CGROUPS.iterdir() if not h.is_symlink() for d in (h / CGROUP_PARENT / i for i in ids)
                if d.is_dir()]

    def kill_pods(self) -> None:
        """SIGKILL every process in this node's pod cgroups (containers, pause), until none is left."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = set()
            for d in self.cgroup_dirs():
                try:
                    pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
                except OSError:
                    continue
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def remove_leftovers(self) -> None:
        """After containerd and its shims are gone: mounts, cgroups, then the directory."""
        subprocess.run(["pkill", "-KILL", "-f", f"containerd-shim.*{self.dir}/"], check=False)
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if line.split()[1].startswith(self.dir + "/")]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False, capture_output=True)
        for d in self.cgroup_dirs():
            try:
                d.rmdir()
            except OSError:
                pass  # still busy: the test run's leftover check names it
        for h in CGROUPS.iterdir():  # shared by every node: the last one out removes it
            try:
                (h / CGROUP_PARENT).rmdir()
            except OSError:
                pass
        subprocess.run(["rm", "-rf", "--one-file-system", self.dir], check=False)


def _first_host(cidr: str) -> str:
    import ipaddress

    return str(next(ipaddress.ip_network(cidr).hosts()))
