"""Container images for the real-node lab, built here without a registry or a container engine
(the real-nodes issue): OCI archives that ``ctr -n k8s.io images import`` takes.

    python -m lab.images              # build (or reuse) the lab's three; print their archives
    python -m lab.images pyproxy      # one of: pyproxy, pause, tools, agnhost, e2e-pause, coredns

- ``pyproxy:dev`` - what the Dockerfile at the repo root builds, from the same recipe: the base,
  the Debian packages and the CMD are read from the Dockerfile itself, so the two cannot drift
  apart (``tests/unit/test_images.py`` also checks it). The root filesystem comes from
  ``mmdebstrap`` (Debian's packages), then pip installs pyproxy's wheel inside it.
- ``pause:lab`` - upstream's pause.c, built static by ``lab/build-node.sh``, alone in the image.
- ``lab-tools:dev`` - Debian with python3, curl and iproute2, plus the lab's echo server and
  client (standard library only) in /opt/lab: the test backends and clients.
- ``agnhost``, ``e2e-pause`` and ``coredns`` - for Kubernetes' own network e2e specs (``lab/e2especs.py``):
  agnhost built by ``lab/build-e2e.sh`` from the cluster's k8s.io/kubernetes, at ``/agnhost`` in
  Debian with the tools the specs exec in it (sh, nc, curl, ip, ss, dig, socat); the lab's
  pause binary again; CoreDNS (also built by ``lab/build-e2e.sh``) alone in its image. Named as the e2e framework asks for them once its registries point at
  ``lab.local`` (the repo-list file ``lab/e2especs.py`` writes), never as upstream's images.

Each archive is cached under /var/cache/pyproxy/images, keyed by a hash of everything that goes
into it (recipe, package list, pyproxy's source files); the layer tar is written in a fixed order
with fixed times and gzip without a timestamp, so the same root filesystem always gives the
same digest. Debian's mirror moves on, so a new build a month later may hold newer packages.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PYPROXY_CACHE_DIR", "/var/cache/pyproxy")) / "images"
EPOCH = 1_700_000_000
"""Every file time in a layer (SOURCE_DATE_EPOCH for mmdebstrap and for pip's byte-code)."""
SUITE = "bookworm"
"""Debian release of every image; the Dockerfile's FROM names the same one."""


@dataclass(frozen=True)
class Recipe:
    """What the Dockerfile says, the part an image builder must follow."""

    base: str
    """The FROM line's image (``debian:bookworm-slim``)."""
    packages: tuple[str, ...]
    """Debian packages its ``apt-get install`` installs, in the order written."""
    cmd: tuple[str, ...]
    """Its CMD (exec form)."""
    entrypoint: tuple[str, ...]
    """Its ENTRYPOINT (exec form; empty: none)."""


def dockerfile_recipe(path: Path = REPO / "Dockerfile") -> Recipe:
    """Read the base, packages, CMD and ENTRYPOINT out of the Dockerfile (its own simple form:
    one ``apt-get install`` with ``--no-install-recommends``, exec-form CMD and ENTRYPOINT)."""
    text = path.read_text().replace("\\\n", " ")
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    install = re.search(r"apt-get install\s+-y\s+--no-install-recommends\s+([^&\n]+)", text)
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M)
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    if not (base and install and cmd and entry):
        raise ValueError(f"{path}: expected FROM, one 'apt-get install -y --no-install-recommends', "
                         "and exec-form CMD and ENTRYPOINT lines")
    return Recipe(base=base.group(1), packages=tuple(install.group(1).split()),
                  cmd=tuple(json.loads(cmd.group(1))), entrypoint=tuple(json.loads(entry.group(1))))


@dataclass
class Image:
    """One image to build: a root filesystem tar and the config that goes with it."""

    ref: str
    """The name containerd lists it under (``docker.io/library/NAME:TAG``)."""
    aliases: tuple[str, ...] = ()
    """Other names for the same image."""
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=lambda: {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})


# -- the OCI archive ---------------------------------------------------------------------------

def _blob(out: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _add(out, f"blobs/sha256/{digest[7:]}", data)
    return digest, len(data)


def _add(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), EPOCH, 0o644
    out.addfile(info, io.BytesIO(data))


def normalise_layer(rootfs_tar: Path) -> bytes:
    """The root filesystem as a layer: members sorted by name, times fixed, owners kept (the
    files belong to root, a few to other system users), no pax headers that carry times."""
    buf = io.BytesIO()
    with tarfile.open(rootfs_tar) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as dst:
        members = sorted(src.getmembers(), key=lambda m: m.name.lstrip("./"))
        for m in members:
            m.name = m.name.lstrip("./") or "."
            if m.name == ".":
                continue
            m.mtime = min(int(m.mtime), EPOCH)
            m.pax_headers = {}
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    return buf.getvalue()


def oci_image(image: Image, layer: bytes) -> tuple[str, bytes, dict[str, bytes]]:
    """An image's manifest (digest, bytes) and its blobs by digest (config, gzipped layer)."""
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6) as z:
        z.write(layer)
    config = {
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Env": [f"{k}={v}" for k, v in image.env.items()],
                   **({"Cmd": list(image.cmd)} if image.cmd else {}),
                   **({"Entrypoint": list(image.entrypoint)} if image.entrypoint else {})},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "lab/images.py"}],
    }
    blobs = {}
    for data in (gz.getvalue(), json.dumps(config, sort_keys=True).encode()):
        blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
    (layer_digest, layer_blob), (config_digest, config_blob) = blobs.items()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config_blob)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": len(layer_blob)}]}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(manifest).hexdigest(), manifest, blobs


def write_archive(image: Image, layer: bytes, out: Path) -> str:
    """Write ``out`` as an OCI image layout in a tar (one layer); return the manifest digest."""
    manifest_digest, manifest, blobs = oci_image(image, layer)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        for data in (*blobs.values(), manifest):
            _blob(tar, data)
        # One descriptor per name: containerd's import makes an image of each.
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "digest": manifest_digest, "size": len(manifest),
                                "annotations": {"io.containerd.image.name": ref,
                                                "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}}
                               for ref in (image.ref, *image.aliases)]}
        _add(tar, "index.json", json.dumps(index, sort_keys=True).encode())
    tmp.rename(out)
    return manifest_digest


def fake_registry(dest: Path, *, name: str, tag: str, image: Image, layer: bytes) -> None:
    """One image laid out as agnhost's fake-registry-server serves it from /var/registry:
    NAME/manifests/TAG holds the digest; manifests and blobs under sha256/XX/HASH/data."""
    manifest_digest, manifest, blobs = oci_image(image, layer)

    def put(kind: str, digest: str, data: bytes) -> None:
        h = digest.split(":", 1)[1]
        path = dest / name / kind / "sha256" / h[:2] / h / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    put("manifests", manifest_digest, manifest)
    for digest, data in blobs.items():
        put("blobs", digest, data)
    (dest / name / "manifests" / tag).write_text(manifest_digest)


# -- root filesystems --------------------------------------------------------------------------

def debian_rootfs(packages: list[str], out: Path, *, hooks: Sequence[str] = ()) -> None:
    """A Debian root filesystem with ``packages`` as a tar, by mmdebstrap (minbase: what
    debian:SUITE-slim holds, plus the packages); ``hooks`` are its --customize-hook commands."""
    if not shutil.which("mmdebstrap"):
        raise SystemExit("images: mmdebstrap not found: run scripts/setup.sh (it installs it)")
    cmd = ["mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
           *([f"--include={','.join(packages)}"] if packages else []),
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
           "--dpkgopt=path-exclude=/usr/share/locale/*",
           *(f"--customize-hook={h}" for h in hooks),
           # What the Dockerfile's `rm -rf /var/lib/apt/lists/*` leaves out.
           '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*',
           SUITE, str(out)]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
    subprocess.run(cmd, check=True, env=env)


def _pyproxy_files() -> list[Path]:
    return sorted([REPO / "pyproject.toml", REPO / "README.md", REPO / "Dockerfile",
                   *(p for p in (REPO / "pyproxy").rglob("*.py"))])


def _key(*parts: object, files: Sequence[Path] = ()) -> str:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(Path(__file__).read_bytes())  # this builder is an input too
    return h.hexdigest()[:16]


def pyproxy_wheel(out: Path) -> Path:
    """pyproxy's wheel from this checkout (pip builds it in an isolated environment, as the
    Dockerfile's ``pip install .`` does) and the wheels of its dependencies beside it, fetched
    here: the image's pip then installs offline (the chroot has neither this host's package
    index settings nor its certificates). Debian's Python is 3.11 on x86_64 like this one."""
    _quiet([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)])
    (wheel,) = out.glob("pyproxy-*.whl")
    _quiet([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
            "-d", str(out), str(wheel)])
    return wheel


def _quiet(argv: list[str]) -> None:
    """Run a build step; its chatter (pip's warnings about this host's settings) is shown only
    when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"images: {' '.join(argv[:4])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def build_pyproxy(tmp: Path) -> tuple[Image, bytes]:
    recipe = dockerfile_recipe()
    if recipe.base != f"debian:{SUITE}-slim":
        raise SystemExit(f"images: the Dockerfile's base is {recipe.base}; this builder makes debian:{SUITE}-slim")
    wheel = pyproxy_wheel(tmp / "wheel")
    rootfs = tmp / "rootfs.tar"
    debian_rootfs(list(recipe.packages), rootfs, hooks=[
        f'mkdir -p "$1/tmp/w" && cp {wheel.parent}/*.whl "$1/tmp/w/"',
        # The Dockerfile's pip line, on the wheel its `pip install .` would build.
        f'chroot "$1" env SOURCE_DATE_EPOCH={EPOCH} pip install --no-cache-dir --break-system-packages --root-user-action=ignore '
        f'-q --no-index --find-links /tmp/w /tmp/w/{wheel.name}',
        'rm -rf "$1/tmp/w" "$1"/root/.cache',
    ])
    return Image(ref="docker.io/library/pyproxy:dev", cmd=recipe.cmd, entrypoint=recipe.entrypoint), \
        normalise_layer(rootfs)


def build_tools(tmp: Path) -> tuple[Image, bytes]:
    rootfs = tmp / "rootfs.tar"
    lab = REPO / "lab"
    debian_rootfs(["python3", "curl", "iproute2", "ca-certificates"], rootfs, hooks=[
        f'mkdir -p "$1/opt/lab" && cp {lab / "echo.py"} {lab / "client.py"} "$1/opt/lab/"'])
    return Image(ref="docker.io/library/lab-tools:dev", cmd=("python3", "/opt/lab/echo.py", "--help")), \
        normalise_layer(rootfs)


def _pause_binary() -> Path:
    node_bin = subprocess.run(["bash", str(REPO / "lab" / "build-node.sh")], check=True,
                              capture_output=True, text=True).stdout.strip()
    return Path(node_bin) / "pause"


def build_pause(tmp: Path) -> tuple[Image, bytes]:
    return Image(ref="docker.io/library/pause:lab", entrypoint=("/pause",)), _pause_layer(tmp)


E2E_REGISTRY = "lab.local"
"""The registry every image of the e2e specs is named under (KUBE_TEST_REPO_LIST points each of
the framework's registries here): nothing is pulled, the lab imports the archives."""
AGNHOST_VERSION = "2.66.1"
"""The agnhost tag the e2e framework of Kubernetes 1.37 asks for (test/utils/image/manifest.go)."""
E2E_PAUSE_VERSION = "3.10.2"
"""Its pause tag (pause pods of the Service specs)."""
COREDNS_VERSION = "1.15.0"
"""The cluster DNS of the e2e specs' lab (lab/clusterdns.py); lab/build-e2e.sh builds it."""
AGNHOST_PACKAGES = ("bash", "curl", "wget", "netcat-openbsd", "iproute2", "dnsutils", "socat", "iputils-ping",
                    "procps", "ca-certificates")
"""What upstream's agnhost image installs for the specs to exec (its Dockerfile, from Alpine;
wget is busybox's there: the Service specs' exec pods fetch with it)."""
E2E_TAGS = {"busybox": "1.37.0-2", "distroless-iptables": "v0.9.9", "regression-issue-74839": "1.5"}
"""The other images' tags in the e2e framework of Kubernetes 1.37 (test/utils/image/manifest.go)."""
IPTABLES_PACKAGES = ("iptables", "nftables", "conntrack")
"""What the privileged host-network exec pod of the kube-proxy specs runs (conntrack -L)."""


def _e2e_binary(name: str) -> Path:
    e2e_bin = subprocess.run(["bash", str(REPO / "lab" / "build-e2e.sh")], check=True, capture_output=True,
                             text=True, env={**os.environ, "COREDNS_VERSION": COREDNS_VERSION}).stdout.strip()
    return Path(e2e_bin.splitlines()[-1]) / name


def _pause_layer(tmp: Path) -> bytes:
    rootfs = tmp / "pause-rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:
        tar.add(_pause_binary(), arcname="pause")
    return normalise_layer(rootfs)


def build_agnhost(tmp: Path) -> tuple[Image, bytes]:
    rootfs = tmp / "rootfs.tar"
    # fake-registry-server serves /var/registry (upstream's image fills it with crane): the
    # LocalhostNodePorts spec pulls pause:testing from it through a localhost NodePort.
    registry = tmp / "registry"
    fake_registry(registry, name="pause", tag="testing", layer=_pause_layer(tmp),
                  image=Image(ref="pause:testing", entrypoint=("/pause",)))
    debian_rootfs(list(AGNHOST_PACKAGES), rootfs, hooks=[f'cp {_e2e_binary("agnhost")} "$1/agnhost"',
                                                         f'mkdir -p "$1/var" && cp -r {registry} "$1/var/registry"'])
    # kube_proxy.go names agnhost in a package variable, set before the repo list is read:
    # that spec asks for the upstream name, which the lab's nodes must hold too.
    return Image(ref=f"{E2E_REGISTRY}/e2e-test-images/agnhost:{AGNHOST_VERSION}", entrypoint=("/agnhost",),
                 aliases=(f"registry.k8s.io/e2e-test-images/agnhost:{AGNHOST_VERSION}",)), \
        normalise_layer(rootfs)


def build_busybox(tmp: Path) -> tuple[Image, bytes]:
    """The conntrack specs run ``sh -c 'echo ... && sleep 15'`` (an init container) and
    ``sh -c 'while true; do sleep 2; nc boom-server 9000& done'`` in it: Debian's essential set
    (dash, coreutils) and an nc that resolves through the cluster DNS (glibc's search path)."""
    rootfs = tmp / "rootfs.tar"
    debian_rootfs(["netcat-openbsd"], rootfs)
    return Image(ref=f"{E2E_REGISTRY}/e2e-test-images/busybox:{E2E_TAGS['busybox']}", cmd=("sh",)), \
        normalise_layer(rootfs)


def build_distroless_iptables(tmp: Path) -> tuple[Image, bytes]:
    rootfs = tmp / "rootfs.tar"
    debian_rootfs(list(IPTABLES_PACKAGES), rootfs)
    ref = f"{E2E_REGISTRY}/build-image/distroless-iptables:{E2E_TAGS['distroless-iptables']}"
    return Image(ref=ref, entrypoint=()), normalise_layer(rootfs)


def build_regression_74839(tmp: Path) -> tuple[Image, bytes]:
    rootfs = tmp / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:  # static (CGO off), raw sockets only
        tar.add(_e2e_binary("regression-issue-74839"), arcname="regression-issue-74839")
    ref = f"{E2E_REGISTRY}/e2e-test-images/regression-issue-74839:{E2E_TAGS['regression-issue-74839']}"
    return Image(ref=ref, entrypoint=("/regression-issue-74839",)), normalise_layer(rootfs)


def build_e2e_pause(tmp: Path) -> tuple[Image, bytes]:
    return Image(ref=f"{E2E_REGISTRY}/pause:{E2E_PAUSE_VERSION}", entrypoint=("/pause",)), _pause_layer(tmp)


def build_coredns(tmp: Path) -> tuple[Image, bytes]:
    rootfs = tmp / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:
        tar.add(_e2e_binary("coredns"), arcname="coredns")  # static (CGO off): nothing else needed
    return Image(ref=f"{E2E_REGISTRY}/coredns:v{COREDNS_VERSION}", entrypoint=("/coredns",)), normalise_layer(rootfs)


BUILDERS = {"pyproxy": build_pyproxy, "pause": build_pause, "tools": build_tools,
            "agnhost": build_agnhost, "e2e-pause": build_e2e_pause, "coredns": build_coredns,
            "busybox": build_busybox, "distroless-iptables": build_distroless_iptables,
            "regression-issue-74839": build_regression_74839}
DEFAULT = ("pyproxy", "pause", "tools")
"""What ``python -m lab.images`` builds with no name (the e2e specs' images build on demand)."""


def build(name: str) -> Path:
    """The archive for image ``name``, built unless the cache holds one for the same inputs."""
    makers: dict[str, Callable[[], list[Path]]] = {
             "pyproxy": _pyproxy_files,
             "tools": lambda: [REPO / "lab" / f for f in ("echo.py", "client.py")],
             "pause": lambda: [_pause_binary()],
             "agnhost": lambda: [_e2e_binary("agnhost")],
             "coredns": lambda: [_e2e_binary("coredns")],
             "e2e-pause": lambda: [_pause_binary()],
             "busybox": lambda: [],
             "distroless-iptables": lambda: [],
             "regression-issue-74839": lambda: [_e2e_binary("regression-issue-74839")]}
    files = makers[name]()
    out = CACHE / f"{name}-{_key(name, SUITE, EPOCH, files=files)}.oci.tar"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"img-{name}-") as tmp:
        image, layer = BUILDERS[name](Path(tmp))
        digest = write_archive(image, layer, out)
    print(f"images: {name} {image.ref} {digest} {out.stat().st_size / 1e6:.0f} MB", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"images to build: {', '.join(BUILDERS)} (default: {', '.join(DEFAULT)})")
    a = p.parse_args()
    unknown = [n for n in a.names if n not in BUILDERS]
    if unknown:
        p.error(f"unknown image {', '.join(unknown)}: choose from {', '.join(BUILDERS)}")
    if os.geteuid() != 0:
        print("images: needs root (mmdebstrap builds the root filesystems as root)", file=sys.stderr)
        return 2
    for name in a.names or list(DEFAULT):
        print(build(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
