"""The lab's image builder (lab/images.py): it follows the Dockerfile, and its OCI archives are
well formed and reproducible."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from lab import images


def test_the_builder_reads_the_users_dockerfile() -> None:
    recipe = images.dockerfile_recipe()
    assert recipe.base == f"debian:{images.SUITE}-slim"
    # What the executors drive and what runs pyproxy: if the Dockerfile loses one, so does the lab's image.
    assert {"python3", "python3-pip", "nftables", "iptables", "conntrack", "iproute2"} <= set(recipe.packages)
    assert recipe.cmd[0] == "pyproxy" and recipe.entrypoint == ()


def test_a_dockerfile_the_builder_cannot_follow_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm-slim\nRUN apt-get install -y curl\nCMD pyproxy\n")
    with pytest.raises(ValueError, match="apt-get install"):
        images.dockerfile_recipe(tmp_path / "Dockerfile")


def test_the_builder_installs_what_the_dockerfile_installs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[str]] = {}

    def rootfs(packages: list[str], out: Path, *, hooks: list[str] = ()) -> None:
        seen["packages"], seen["hooks"] = packages, list(hooks)
        with tarfile.open(out, "w") as tar:
            tar.addfile(tarfile.TarInfo("etc"))

    monkeypatch.setattr(images, "debian_rootfs", rootfs)
    monkeypatch.setattr(images, "pyproxy_wheel", lambda out: out / "pyproxy-0.1.0-py3-none-any.whl")
    image, _ = images.build_pyproxy(tmp_path)
    recipe = images.dockerfile_recipe()
    assert tuple(seen["packages"]) == recipe.packages
    assert image.cmd == recipe.cmd and image.entrypoint == recipe.entrypoint
    assert any("pip install" in h and "--break-system-packages" in h for h in seen["hooks"])


def _rootfs(path: Path, mtime: int) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in (("./usr/bin/tool", b"#!/bin/sh\n"), ("./etc/os-release", b"ID=debian\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def _read(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_the_archive_is_an_oci_layout_containerd_can_name(tmp_path: Path) -> None:
    layer = images.normalise_layer(_rootfs(tmp_path / "r.tar", 1_800_000_000))
    image = images.Image(ref="docker.io/library/pyproxy:dev", cmd=("pyproxy", "run"))
    digest = images.write_archive(image, layer, tmp_path / "img.tar")
    files = _read(tmp_path / "img.tar")
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]  # content addressed
    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    assert entry["digest"] == digest
    assert entry["annotations"]["io.containerd.image.name"] == "docker.io/library/pyproxy:dev"
    manifest = json.loads(files[f"blobs/sha256/{digest[7:]}"])
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'][7:]}"])
    assert config["config"]["Cmd"] == ["pyproxy", "run"]
    blob = gzip.decompress(files[f"blobs/sha256/{manifest['layers'][0]['digest'][7:]}"])
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(blob).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["etc/os-release", "usr/bin/tool"]  # sorted, no "./"
    assert {m.mtime for m in members} == {images.EPOCH}  # clamped


def test_the_same_root_filesystem_gives_the_same_digest(tmp_path: Path) -> None:
    image = images.Image(ref="docker.io/library/x:dev")
    a = images.write_archive(image, images.normalise_layer(_rootfs(tmp_path / "a.tar", 1_800_000_000)),
                             tmp_path / "a.oci")
    b = images.write_archive(image, images.normalise_layer(_rootfs(tmp_path / "b.tar", 1_900_000_000)),
                             tmp_path / "b.oci")
    assert a == b
    assert (tmp_path / "a.oci").read_bytes() == (tmp_path / "b.oci").read_bytes()


def test_an_image_has_one_name_per_alias_and_the_fake_registry_serves_the_same_manifest(tmp_path: Path) -> None:

    image = images.Image(ref="lab.local/x:1", aliases=("registry.k8s.io/x:1",), entrypoint=("/pause",))
    layer = b"layer" * 100
    digest = images.write_archive(image, layer, tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == \
        ["lab.local/x:1", "registry.k8s.io/x:1"]
    assert {m["digest"] for m in index["manifests"]} == {digest}
    # agnhost's fake-registry-server: the tag file names the manifest, every blob under its hash.
    images.fake_registry(tmp_path / "reg", name="pause", tag="testing", image=image, layer=layer)
    assert (tmp_path / "reg/pause/manifests/testing").read_text() == digest
    h = digest.split(":")[1]
    manifest = json.loads((tmp_path / f"reg/pause/manifests/sha256/{h[:2]}/{h}/data").read_bytes())
    for blob in [manifest["config"], *manifest["layers"]]:
        b = blob["digest"].split(":")[1]
        data = (tmp_path / f"reg/pause/blobs/sha256/{b[:2]}/{b}/data").read_bytes()
        assert hashlib.sha256(data).hexdigest() == b and len(data) == blob["size"]
