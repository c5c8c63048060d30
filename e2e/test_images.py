"""pyproxy's image, built here (lab/images.py), run by a real containerd and runc
(lab/build-node.sh) the way the chart runs it: every capability dropped but NET_ADMIN, a
read-only root filesystem, a network namespace of its own. The first step of the real-nodes
issue: the image exists and runs before any kubelet starts it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import images

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "pyproxy-e2e"
# runc's default set (what a container gets unless told otherwise), each dropped by name:
# containerd 2's ctr has no "drop all".
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")


class Containerd:
    """A private containerd: its own root, state and sockets in a temporary directory, its
    process in a network namespace made for it (entered with nsenter, so it keeps the host's
    mount namespace as a node's containerd does)."""

    def __init__(self, bin_dir: str) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="pxctr-"))
        self.netns = f"pxctr-{uuid.uuid4().hex[:6]}"
        self.sock = str(self.dir / "containerd.sock")
        (self.dir / "config.toml").write_text(f"""version = 3
root = "{self.dir}/root"
state = "{self.dir}/state"
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.dir}/containerd-ttrpc.sock"
[plugins.'io.containerd.cri.v1.runtime']
  disabled = true
[plugins.'io.containerd.grpc.v1.cri']
  disabled = true
""")
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.log = open(self.dir / "containerd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", f"{bin_dir}/containerd", "--config",
             str(self.dir / "config.toml")], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.dir / "containerd.log").read_text()
            time.sleep(0.1)

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([f"{self.bin}/ctr", "-a", self.sock, "-n", NAMESPACE, *args], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"})

    def run(self, *command: str, caps: tuple[str, ...] = ("NET_ADMIN",), mounts: tuple[str, ...] = ()) -> \
            subprocess.CompletedProcess[str]:
        """Run ``command`` in pyproxy's image with exactly ``caps`` and a read-only root."""
        flags = [f"--cap-drop=CAP_{c}" for c in DEFAULT_CAPS if c not in caps]
        flags += [f"--cap-add=CAP_{c}" for c in caps]
        flags += [f"--mount={m}" for m in mounts]
        return self.ctr("run", "--rm", "--read-only", *flags, "docker.io/library/pyproxy:dev",
                        f"t{uuid.uuid4().hex[:8]}", *command)

    def stop(self) -> None:
        for task in self.ctr("tasks", "ls", "-q").stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        # Shims outlive containerd by design; ours hold our socket directory in their command line.
        subprocess.run(["pkill", "-KILL", "-f", f"containerd-shim.*{self.dir}"], check=False)
        self.log.close()
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.dir))]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            for d in sorted(hierarchy.glob(f"{NAMESPACE}/**"), key=lambda p: -len(p.parts)) + [hierarchy / NAMESPACE]:
                if d.is_dir():
                    try:
                        d.rmdir()
                    except OSError:
                        pass  # still busy: left for the suite's leftover check to report
        subprocess.run(["ip", "netns", "del", self.netns], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    if os.geteuid() != 0 or not shutil.which("mmdebstrap"):
        why = "needs root and mmdebstrap (scripts/setup.sh installs it)"
        if os.environ.get("CI") or os.environ.get("PYPROXY_ALL_TIERS"):
            pytest.fail(f"image tests cannot run here: {why}")
        pytest.skip(why)
    bin_dir = subprocess.run(["bash", str(REPO / "lab" / "build-node.sh")], check=True, capture_output=True,
                             text=True, timeout=3600).stdout.strip()
    archive = images.build("pyproxy")
    ctr = Containerd(bin_dir)
    try:
        got = ctr.ctr("images", "import", str(archive))
        assert got.returncode == 0, got.stderr
        yield ctr
    finally:
        ctr.stop()


def test_the_image_holds_what_the_dockerfile_installs(containerd: Containerd) -> None:
    recipe = images.dockerfile_recipe()
    got = containerd.run("dpkg-query", "-W", "-f", "${Package} ${Status}\n", *recipe.packages)
    assert got.returncode == 0, got.stderr
    installed = {line.split()[0] for line in got.stdout.splitlines() if line.endswith("install ok installed")}
    assert installed == set(recipe.packages)
    got = containerd.run(*recipe.cmd)
    assert got.returncode == 0 and "--proxy-mode" in got.stdout, got.stderr


@pytest.mark.parametrize(("mode", "caps"), [
    ("nftables", ("NET_ADMIN",)),
    ("iptables-nft", ("NET_ADMIN",)),
    ("iptables-legacy", ("NET_ADMIN", "NET_RAW")),
])
def test_pyproxy_programs_its_namespace_with_only_the_charts_capabilities(containerd: Containerd, mode: str,
                                                                          caps: tuple[str, ...]) -> None:
    """As the chart runs it: NET_ADMIN alone (NET_RAW too for legacy iptables), read-only root,
    the container's own network namespace; the rules land in that namespace."""
    proxy_mode, _, backend = mode.partition("-")
    flags = ["--proxy-mode", proxy_mode, *(["--iptables-backend", backend] if backend else [])]
    lister = {"nftables": "nft list table ip pyproxy", "iptables-nft": "iptables-nft-save -t nat",
              "iptables-legacy": "iptables-legacy-save -t nat"}[mode]
    got = containerd.run(
        "sh", "-c", "grep CapEff /proc/self/status && pyproxy run --once --source-file /in/demo.yaml "
        f"--hostname-override node-a --ip-families 4 {' '.join(flags)} && {lister}",
        caps=caps, mounts=(f"type=bind,src={REPO / 'examples'},dst=/in,options=rbind:ro",))
    assert got.returncode == 0, got.stdout + got.stderr
    want_mask = sum(1 << {"NET_ADMIN": 12, "NET_RAW": 13}[c] for c in caps)
    assert int(got.stdout.split()[1], 16) == want_mask  # exactly these capabilities, nothing else
    assert "10.96.0.10" in got.stdout  # the demo's web Service, in the container's own namespace


def test_without_net_admin_pyproxy_says_which_capability_is_missing(containerd: Containerd) -> None:
    got = containerd.run("pyproxy", "run", "--once", "--source-file", "/in/demo.yaml", "--hostname-override",
                         "node-a", caps=(), mounts=(f"type=bind,src={REPO / 'examples'},dst=/in,options=rbind:ro",))
    assert got.returncode == 2, got.stdout + got.stderr
    assert "needs the NET_ADMIN capability" in got.stderr
