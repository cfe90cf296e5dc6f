"""Images: import of rootfs tars (plain, gzip), directories, `docker save` archives and OCI
layouts (directory and tar); whiteouts; progress; list / remove / replace; bad imports.

Every test image is built here, by hand, from the tiny (busybox) image plus a `/data` tree
with known modes, owners, links and a device node, and is checked from inside a real
sandbox. Layer archives are written with `tarfile` in the exact shapes the formats use.
Device nodes are dropped by the importer, which says so (hostile images: see
test_image_attacks.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shlex
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

import deltabox
from conftest import TINY_TAR

MTIME = 1_700_000_000


# ---- building layers -----------------------------------------------------------------------

class Layer:
    """An in-memory tar archive built member by member."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.GNU_FORMAT)

    def _info(self, name, type_, mode, uid=0, gid=0, **kw) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type_, mode, uid, gid, MTIME
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    def dir(self, name, mode=0o755, uid=0, gid=0) -> "Layer":
        self.tf.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))
        return self

    def file(self, name, data: bytes = b"", mode=0o644, uid=0, gid=0) -> "Layer":
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid, size=len(data))
        self.tf.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name, target) -> "Layer":
        self.tf.addfile(self._info(name, tarfile.SYMTYPE, 0o777, linkname=target))
        return self

    def hardlink(self, name, target) -> "Layer":
        self.tf.addfile(self._info(name, tarfile.LNKTYPE, 0o644, linkname=target))
        return self

    def chardev(self, name, major, minor, mode=0o666) -> "Layer":
        self.tf.addfile(self._info(name, tarfile.CHRTYPE, mode, devmajor=major,
                                   devminor=minor))
        return self

    def copy_tar(self, path: Path) -> "Layer":
        with tarfile.open(path) as src:
            for m in src:
                self.tf.addfile(m, src.extractfile(m) if m.isreg() else None)
        return self

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def base_layer() -> Layer:
    """tiny + /data with every kind of entry an import must restore exactly."""
    return (Layer().copy_tar(TINY_TAR)
            .dir("./data")
            .file("./data/hello.txt", b"hello\n", 0o644, 1234, 1234)
            .hardlink("./data/hard", "./data/hello.txt")
            .symlink("./data/link", "hello.txt")
            .symlink("./data/abslink", "/etc/hostname")
            .file("./data/run.sh", b"#!/bin/sh\necho ran\n", 0o755)
            .file("./data/private", b"p", 0o600, 1234, 5678)
            .file("./data/suid", b"s", 0o4755)
            .dir("./data/sticky", 0o1777)
            .dir("./data/owned", 0o700, 1234, 1234)
            .file("./data/owned/inner", b"i", 0o640, 1234, 1234)
            .chardev("./data/null", 1, 3)
            # removed / hidden by the upper layer of the layered formats
            .file("./data/gone.txt", b"gone\n")
            .dir("./data/gonedir")
            .file("./data/gonedir/f", b"f")
            .dir("./data/opq")
            .file("./data/opq/old1", b"1")
            .file("./data/opq/old2", b"2")
            .dir("./data/opq/olddir")
            .file("./data/changed.txt", b"v1\n"))


def upper_layer() -> Layer:
    """Deletes a file and a dir of the base (.wh.NAME), makes data/opq opaque."""
    return (Layer()
            .dir("./data")
            .file("./data/.wh.gone.txt")
            .file("./data/.wh.gonedir")
            .dir("./data/opq")
            .file("./data/opq/.wh..wh..opq")
            .file("./data/opq/new.txt", b"new\n")
            .file("./data/changed.txt", b"v2\n")
            .file("./data/added.txt", b"added\n", 0o600, 1234, 1234))


def _tar_of(entries: list[tuple[str, bytes]]) -> bytes:
    """An archive of plain files (and their parent dirs) in the given order."""
    lay = Layer()
    seen = set()
    for name, data in entries:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen:
                seen.add(d)
                lay.dir(d)
        lay.file(name, data)
    return lay.bytes()


def docker_archive(layers: list[bytes]) -> bytes:
    """A legacy `docker save` archive, members in the order docker writes them
    (sorted: layer dirs, the config, manifest.json, repositories)."""
    ids = [hashlib.sha256(b"%d" % i + data[:64]).hexdigest() for i, data in enumerate(layers)]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [
        "sha256:" + hashlib.sha256(d).hexdigest() for d in layers]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    files = {}
    for lid, data in zip(ids, layers):
        files[f"{lid}/VERSION"] = b"1.0"
        files[f"{lid}/json"] = json.dumps({"id": lid}).encode()
        files[f"{lid}/layer.tar"] = data
    files[config_name] = config
    files["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": ["test:latest"],
                                          "Layers": [f"{i}/layer.tar" for i in ids]}]).encode()
    files["repositories"] = json.dumps({"test": {"latest": ids[-1]}}).encode()
    return _tar_of(sorted(files.items()))


def oci_layout(dst: Path, layers: list[bytes]) -> Path:
    """An OCI image layout directory with gzip-compressed layers."""
    blobs = dst / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    gz = [gzip.compress(d, mtime=0) for d in layers]
    config = blob(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(d).hexdigest()
                                       for d in layers]}}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            **blob(g)} for g in gz]}
    mdesc = blob(json.dumps(manifest).encode())
    (dst / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (dst / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **mdesc,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return dst


def tar_dir(src: Path, dst: Path) -> Path:
    with tarfile.open(dst, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return dst


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> source path, one per supported format."""
    d = tmp_path_factory.mktemp("image-sources")
    base, upper = base_layer().bytes(), upper_layer().bytes()
    out = {}
    out["tar"] = d / "rootfs.tar"
    out["tar"].write_bytes(base)
    out["tgz"] = d / "rootfs.tar.gz"
    out["tgz"].write_bytes(gzip.compress(base))
    out["txz"] = d / "rootfs.tar.xz"
    out["txz"].write_bytes(lzma.compress(base))
    out["tzst"] = d / "rootfs.tar.zst"
    subprocess.run(["zstd", "-q", "-f", str(out["tar"]), "-o", str(out["tzst"])], check=True)
    out["dir"] = d / "rootfs-dir"
    out["dir"].mkdir()
    # GNU tar as root restores owners, modes, hardlinks and the device node
    subprocess.run(["tar", "-x", "-f", str(out["tar"]), "-C", str(out["dir"]),
                    "--numeric-owner", "--same-permissions", "--same-owner"], check=True)
    out["docker"] = d / "docker-save.tar"
    out["docker"].write_bytes(docker_archive([base, upper]))
    out["oci-dir"] = oci_layout(d / "oci-dir", [base, upper])
    out["oci-tar"] = tar_dir(out["oci-dir"], d / "oci.tar")
    return out


@pytest.fixture
def images(client):
    """Names of images made by a test; removed afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        for s in client.list():
            if s.info.image == name:
                s.destroy()
        try:
            client.remove_image(name)
        except deltabox.NotFound:
            pass


def layer_dirs(daemon) -> set[str]:
    return {p.name for p in (daemon.state_dir / "store" / "layers").iterdir()}


def tmp_dirs(daemon) -> set[str]:
    return {p.name for p in (daemon.state_dir / "store" / "tmp").iterdir()}


def sh(sbx, cmd: str) -> str:
    r = sbx.exec(cmd)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout.decode()


def check_base_tree(sbx) -> None:
    """Files, modes, owners and links of base_layer() inside a sandbox; its device node
    was dropped."""
    stats = dict(line.split(" ", 1) for line in sh(sbx, (
        "cd /data && stat -c '%n %a %u %g %F' hello.txt run.sh private suid sticky owned "
        "owned/inner link")).splitlines())
    assert stats == {
        "hello.txt": "644 1234 1234 regular file",
        "run.sh": "755 0 0 regular file",
        "private": "600 1234 5678 regular file",
        "suid": "4755 0 0 regular file",
        "sticky": "1777 0 0 directory",
        "owned": "700 1234 1234 directory",
        "owned/inner": "640 1234 1234 regular file",
        "link": "777 0 0 symbolic link",
    }
    assert sbx.exec("test -e /data/null || test -L /data/null").exit_code == 1
    assert sh(sbx, "readlink /data/link; readlink /data/abslink") == "hello.txt\n/etc/hostname\n"
    assert sh(sbx, "cat /data/link") == "hello\n"
    assert sbx.exec("cat /data/abslink").exit_code == 0
    # a hardlink: the same inode, link count 2
    ino = sh(sbx, "stat -c '%i %h' /data/hello.txt /data/hard").splitlines()
    assert ino[0] == ino[1] and ino[0].endswith(" 2"), ino
    assert sh(sbx, "/data/run.sh") == "ran\n"
    assert sh(sbx, "busybox echo ok") == "ok\n"


# ---- formats -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,expected_format", [("tar", "tar"), ("tgz", "tar"), ("txz", "tar"),
                                                 ("tzst", "tar"), ("dir", "dir")])
def test_import_single_layer_sources(client, images, sources, fmt, expected_format):
    name = f"t-{fmt}"
    img = client.import_image(name, sources[fmt])
    images.append(name)
    assert img.name == name and img.source_format == expected_format
    assert len(img.layer_ids) == 1 and img.size_bytes > 1_000_000
    assert img.source == str(sources[fmt].resolve())
    with client.create(name) as sbx:
        check_base_tree(sbx)
        # single-layer sources keep what the layered formats delete
        assert sh(sbx, "cat /data/gone.txt /data/changed.txt") == "gone\nv1\n"
        assert sorted(sh(sbx, "ls -A /data/opq").split()) == ["old1", "old2", "olddir"]


@pytest.mark.parametrize("fmt,expected_format", [("docker", "docker-archive"),
                                                 ("oci-dir", "oci"), ("oci-tar", "oci")])
def test_import_layered_sources_apply_whiteouts(client, images, sources, fmt, expected_format):
    name = f"t-{fmt}"
    img = client.import_image(name, sources[fmt])
    images.append(name)
    assert img.source_format == expected_format
    assert len(img.layer_ids) == 2
    with client.create(name) as sbx:
        check_base_tree(sbx)
        # .wh.NAME deleted a file and a directory of the lower layer
        assert sbx.exec("test -e /data/gone.txt || test -e /data/gonedir").exit_code == 1
        # the opaque dir shows only the upper layer's entries
        assert sh(sbx, "ls -A /data/opq") == "new.txt\n"
        assert sh(sbx, "cat /data/opq/new.txt /data/changed.txt") == "new\nv2\n"
        assert sh(sbx, "stat -c '%a %u %g' /data/added.txt") == "600 1234 1234\n"
        # no whiteout marker is visible as a file
        assert ".wh." not in sh(sbx, "find /data")
        # whiteouts are not inherited by the sandbox: a deleted name can be recreated
        sh(sbx, "echo again > /data/gone.txt && mkdir /data/gonedir")
        assert sh(sbx, "cat /data/gone.txt; ls -A /data/gonedir") == "again\n"


def test_docker_archive_with_many_layers(client, images, tmp_path):
    """`docker save` writes manifest.json after every layer dir; an image with 20 layers
    (common) puts it well past the first 64 members of the archive."""
    layers = [base_layer().bytes()] + [
        Layer().dir("./layers").file(f"./layers/{i:02d}", b"%d\n" % i).bytes()
        for i in range(1, 20)]
    src = tmp_path / "many.tar"
    src.write_bytes(docker_archive(layers))
    img = client.import_image("t-many-layers", src)
    images.append("t-many-layers")
    assert img.source_format == "docker-archive", img
    assert len(img.layer_ids) == 20
    with client.create("t-many-layers") as sbx:
        assert sh(sbx, "ls /layers | wc -l").strip() == "19"
        check_base_tree(sbx)


@pytest.mark.parametrize("fmt", ["tar", "dir", "docker"])
def test_dropped_device_nodes_are_named(client, images, sources, fmt):
    """Device nodes are not imported (see deltabox/images.py); the import names them."""
    msgs = []
    client.import_image(f"t-dev-{fmt}", sources[fmt], progress=msgs.append)
    images.append(f"t-dev-{fmt}")
    warnings = [m.phase for m in msgs if m.phase.startswith("warning:")]
    assert len(warnings) == 1 and "device node" in warnings[0], [m.phase for m in msgs]
    assert "data/null" in warnings[0]


def test_xattrs_are_restored_but_not_overlay_ones(client, daemon, images, tmp_path):
    """pax SCHILY.xattr records become xattrs (file capabilities included); overlayfs's
    own (redirects, metacopy, opaque) are the importer's business only: dropped."""
    cap = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # v2: cap_net_raw permitted
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, xattrs in (("ping", {"SCHILY.xattr.security.capability": cap,
                                       "SCHILY.xattr.user.note": b"\xff\0hi"}),
                             ("redir", {"SCHILY.xattr.trusted.overlay.redirect": b"/etc",
                                        "SCHILY.xattr.trusted.overlay.metacopy": b""})):
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = 0o755, MTIME
            ti.pax_headers = {k: v.decode("utf-8", "surrogateescape")
                              for k, v in xattrs.items()}
            tf.addfile(ti, io.BytesIO(b""))
    src = tmp_path / "xattrs.tar"
    src.write_bytes(buf.getvalue())
    msgs = []
    img = client.import_image("t-xattrs", src, progress=msgs.append)
    images.append("t-xattrs")
    layer = daemon.state_dir / "store" / "layers" / img.layer_ids[0]
    assert os.getxattr(layer / "ping", "security.capability") == cap
    assert os.getxattr(layer / "ping", "user.note") == b"\xff\0hi"  # binary, as is
    assert not [x for x in os.listxattr(layer / "redir") if "overlay" in x]
    assert any("trusted.overlay.redirect" in m.phase for m in msgs), [m.phase for m in msgs]
    assert stat.S_IMODE(os.lstat(layer / "ping").st_mode) == 0o755


def test_progress_is_streamed(client, images, sources):
    msgs = []
    img = client.import_image("t-progress", sources["docker"], progress=msgs.append)
    images.append("t-progress")
    assert img is not None and img.name == "t-progress"
    before_final = [m for m in msgs if m.image is None]
    assert len(before_final) >= 1
    assert any(m.phase.startswith("layer") for m in before_final), [m.phase for m in msgs]
    # per-layer byte counts grow to the layer's size
    layer1 = [m for m in before_final if m.phase == "layer 1"]
    assert layer1 and layer1[-1].done_bytes == layer1[-1].total_bytes > 0
    assert [m.done_bytes for m in layer1] == sorted(m.done_bytes for m in layer1)
    # exactly one final message, and it is the last
    assert [m.image is not None for m in msgs].count(True) == 1 and msgs[-1].image is not None


# ---- list / remove / replace ---------------------------------------------------------------

def test_list_and_remove_frees_layers(client, daemon, images, sources):
    before = layer_dirs(daemon)
    img = client.import_image("t-listrm", sources["docker"])
    images.append("t-listrm")
    listed = {i.name: i for i in client.list_images()}
    assert "t-listrm" in listed and "tiny" in listed
    assert list(listed["t-listrm"].layer_ids) == list(img.layer_ids)
    assert listed["t-listrm"].source_format == "docker-archive"
    assert layer_dirs(daemon) == before | set(img.layer_ids)
    client.remove_image("t-listrm")
    assert "t-listrm" not in {i.name for i in client.list_images()}
    assert layer_dirs(daemon) == before
    with pytest.raises(deltabox.NotFound, match="t-listrm"):
        client.remove_image("t-listrm")
    with pytest.raises(deltabox.NotFound, match="t-listrm"):
        client.create("t-listrm")


def test_remove_image_in_use_is_refused(client, daemon, images, sources):
    client.import_image("t-inuse", sources["tar"])
    images.append("t-inuse")
    sbx = client.create("t-inuse", name="inuse-user")
    try:
        with pytest.raises(deltabox.FailedPrecondition, match="t-inuse") as exc:
            client.remove_image("t-inuse")
        assert "inuse-user" in exc.value.message
        # nothing changed: the image is listed and the sandbox still works
        assert "t-inuse" in {i.name for i in client.list_images()}
        assert sh(sbx, "cat /data/hello.txt") == "hello\n"
    finally:
        sbx.destroy()
    client.remove_image("t-inuse")
    assert "t-inuse" not in {i.name for i in client.list_images()}


def test_reimport_needs_replace(client, daemon, images, sources):
    first = client.import_image("t-replace", sources["tar"])
    images.append("t-replace")
    before = layer_dirs(daemon)
    with pytest.raises(deltabox.AlreadyExists, match="t-replace"):
        client.import_image("t-replace", sources["docker"])
    assert layer_dirs(daemon) == before, "a refused import left layers behind"
    assert not tmp_dirs(daemon)
    second = client.import_image("t-replace", sources["docker"], replace=True)
    assert second.source_format == "docker-archive" and len(second.layer_ids) == 2
    images_now = {i.name: i for i in client.list_images()}
    assert list(images_now["t-replace"].layer_ids) == list(second.layer_ids)
    # the old image's layer is freed, the new ones are there
    assert layer_dirs(daemon) == (before - set(first.layer_ids)) | set(second.layer_ids)
    with client.create("t-replace") as sbx:
        assert sh(sbx, "ls -A /data/opq") == "new.txt\n"


def test_replace_while_in_use_is_refused(client, daemon, images, sources):
    img = client.import_image("t-replace-busy", sources["tar"])
    images.append("t-replace-busy")
    with client.create("t-replace-busy") as sbx:
        before = layer_dirs(daemon)
        with pytest.raises(deltabox.FailedPrecondition, match="t-replace-busy"):
            client.import_image("t-replace-busy", sources["docker"], replace=True)
        assert layer_dirs(daemon) == before
        assert not tmp_dirs(daemon)
        listed = {i.name: i for i in client.list_images()}["t-replace-busy"]
        assert list(listed.layer_ids) == list(img.layer_ids)
        assert sh(sbx, "cat /data/gone.txt") == "gone\n"


@pytest.mark.parametrize("bad", ["", "UPPER", "a/b", "../x", "x" * 200, "-lead", "sp ace"])
def test_invalid_image_names(client, daemon, sources, bad):
    before = layer_dirs(daemon)
    with pytest.raises(deltabox.InvalidArgument) as exc:
        client.import_image(bad, sources["tar"])
    assert repr(bad) in exc.value.message
    assert bad not in {i.name for i in client.list_images()}
    assert layer_dirs(daemon) == before


def _garbage(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a tar archive\n" * 100)
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(300_000))
    gz_text = tmp_path / "notes.txt.gz"
    gz_text.write_bytes(gzip.compress(text.read_bytes() * 50))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(gzip.compress(base_layer().bytes())[:200_000])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    return {"text": text, "random": rnd, "gzip-of-text": gz_text, "truncated-gzip": truncated,
            "empty": empty}


@pytest.mark.parametrize("kind", ["text", "random", "gzip-of-text", "truncated-gzip", "empty"])
def test_non_tar_is_rejected_and_leaves_nothing(client, daemon, tmp_path, kind):
    src = _garbage(tmp_path)[kind]
    before = layer_dirs(daemon)
    with pytest.raises(deltabox.InvalidArgument) as exc:
        client.import_image("t-garbage", src)
    assert exc.value.message
    assert "t-garbage" not in {i.name for i in client.list_images()}
    assert layer_dirs(daemon) == before
    assert not tmp_dirs(daemon), "a failed import left work in store/tmp"


def test_malformed_layered_sources(client, daemon, tmp_path, sources):
    """A docker archive whose manifest names a missing layer, an OCI index without manifests."""
    before = layer_dirs(daemon)
    missing = tmp_path / "missing-layer.tar"
    missing.write_bytes(_tar_of([("manifest.json", json.dumps(
        [{"Config": "c.json", "Layers": ["nosuchlayer/layer.tar"]}]).encode())]))
    with pytest.raises(deltabox.InvalidArgument, match="nosuchlayer"):
        client.import_image("t-malformed", missing)
    oci = tmp_path / "oci-empty"
    oci.mkdir()
    (oci / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (oci / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    with pytest.raises(deltabox.InvalidArgument, match="oci"):
        client.import_image("t-malformed", oci)
    assert layer_dirs(daemon) == before and not tmp_dirs(daemon)
    assert "t-malformed" not in {i.name for i in client.list_images()}


def test_missing_source_is_not_found(client, tmp_path):
    with pytest.raises(deltabox.NotFound, match="nosuchfile"):
        client.import_image("t-missing", tmp_path / "nosuchfile.tar")


# ---- the image's root directory ------------------------------------------------------------

def _tiny_without_root() -> Layer:
    """tiny's entries without its "./" entry: the layer's root mode is the importer's."""
    lay = Layer()
    with tarfile.open(TINY_TAR) as src:
        for m in src:
            if m.name.strip("/") not in ("", "."):
                lay.tf.addfile(m, src.extractfile(m) if m.isreg() else None)
    return lay


def _root_source(tmp_path: Path, fmt: str, root_mode: int | None) -> Path:
    """A tiny image in `fmt` whose root has `root_mode` ("./" entry), or no "./" entry."""
    base = _tiny_without_root()
    if root_mode is not None:
        base.dir(".", root_mode)
    data = base.bytes()
    if fmt == "tar":
        return _write(tmp_path / "root.tar", data)
    if fmt == "docker":  # the upper layer carries the root: overlay shows the top one
        upper = Layer().file("./etc/motd", b"hi\n")
        if root_mode is not None:
            upper.dir(".", root_mode)
        return _write(tmp_path / "root-docker.tar", docker_archive([data, upper.bytes()]))
    if fmt == "oci":
        return oci_layout(tmp_path / "root-oci", [data])
    src = tmp_path / "root-dir"
    src.mkdir()
    subprocess.run(["tar", "-x", "-f", str(_write(tmp_path / "x.tar", data)), "-C", str(src),
                    "--numeric-owner", "--same-permissions", "--same-owner"], check=True)
    os.chmod(src, 0o755 if root_mode is None else root_mode)
    return src


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def as_nobody(cmd: str) -> str:
    """`cmd` run by uid 65534 (busybox's su: root needs no password)."""
    return f"su -s /bin/sh nobody -c {shlex.quote(cmd)}"


@pytest.mark.parametrize("fmt", ["tar", "docker", "oci", "dir"])
def test_a_non_root_user_can_use_an_imported_image(client, images, tmp_path, fmt):
    """The layer root came from a temp dir (0700): nobody but root could even run /bin/ls."""
    name = f"t-root-{fmt}"
    client.import_image(name, _root_source(tmp_path, fmt, None))
    images.append(name)
    with client.create(name) as sbx:
        assert sh(sbx, "stat -c '%a %u %g' /") == "755 0 0\n"
        r = sbx.exec(as_nobody("/bin/ls /"))
        assert r.exit_code == 0 and b"bin" in r.stdout.split(), r
        r = sbx.exec(as_nobody("id -u; cat /etc/passwd >/dev/null && echo read"))
        assert r.stdout == b"65534\nread\n", r
        # a checkpoint's layer, and the upper of a rollback, keep the root's mode
        sbx.exec("touch /new").check()
        ck = sbx.checkpoint()
        sbx.rollback(ck)
        assert sh(sbx, "stat -c '%a' /") == "755\n"
        assert sbx.exec(as_nobody("/bin/ls /")).exit_code == 0


@pytest.mark.parametrize("fmt", ["tar", "docker", "oci", "dir"])
def test_the_images_own_root_mode_is_kept(client, images, tmp_path, fmt):
    name = f"t-root750-{fmt}"
    client.import_image(name, _root_source(tmp_path, fmt, 0o750))
    images.append(name)
    with client.create(name) as sbx:
        assert sh(sbx, "stat -c '%a' /") == "750\n"
        assert sbx.exec(as_nobody("/bin/ls /")).exit_code != 0  # the image said so
        # and it is kept across a checkpoint and a rollback (a new upper)
        ck = sbx.checkpoint()
        sbx.exec("touch /new").check()
        sbx.rollback(ck)
        assert sh(sbx, "stat -c '%a' /") == "750\n"


def test_python_runs_as_a_non_root_user_in_the_demo_image(demo):
    """The demo image (debootstrap: a dynamically linked python and libc)."""
    setpriv = "setpriv --reuid=65534 --regid=65534 --clear-groups"
    r = demo.exec(f"{setpriv} python3 -c 'import os, json; print(os.getuid(), "
                  "json.dumps(sorted(os.listdir(\"/\"))[:1]))'")
    assert r.exit_code == 0 and r.stdout.startswith(b"65534 "), r
    assert demo.exec(f"{setpriv} /bin/ls /").exit_code == 0
