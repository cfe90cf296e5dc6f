"""Image import: rootfs tarballs, directories, `docker save` archives, OCI layouts.

Each source becomes one or more finished layer directories in the store's tmp
area, which `Store.commit_image` then renames into place in one transaction.
Layer tarballs are unpacked by GNU tar (it restores owners, modes, device
nodes, hardlinks and xattrs exactly); Python feeds it the bytes, which gives
progress reporting and in-process decompression. OCI/Docker whiteouts become
overlayfs whiteouts afterwards.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable

import structlog

from deltabox.errors import InvalidArgument, NotFound
from deltabox.store import ImageRecord, Store, _rmtree, validate_name

__all__ = ["import_image", "detect_format", "Progress"]

log = structlog.get_logger("deltabox.images")

Progress = Callable[[str, int, int], None]  # (phase, done_bytes, total_bytes)
CHUNK = 1 << 20
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def detect_format(source: Path) -> str:
    """'dir', 'oci', 'docker-archive' or 'tar'."""
    if source.is_dir():
        if (source / "oci-layout").exists() and (source / "index.json").exists():
            return "oci"
        return "dir"
    if not source.is_file():
        raise NotFound(f"image source {source} does not exist")
    if _compression(source) is None and tarfile.is_tarfile(source):
        # All headers: `docker save` writes manifest.json after every layer.
        with tarfile.open(source) as tf:
            names = {m.name.lstrip("./") for m in tf}
        if "manifest.json" in names:
            return "docker-archive"
        if "oci-layout" in names and "index.json" in names:
            return "oci"
    return "tar"


def import_image(store: Store, name: str, source: Path, progress: Progress,
                 replace: bool = False) -> ImageRecord:
    validate_name(name, "image")
    source = source.resolve()
    fmt = detect_format(source)
    layer_dirs: list[Path] = []
    try:
        if fmt == "dir":
            layer_dirs.append(_import_directory(store, source, progress))
        elif fmt == "tar":
            total = source.stat().st_size
            with open(source, "rb") as f:
                layer_dirs.append(_unpack_layer(store, f, total, "rootfs", progress))
        else:
            for i, (opener, size) in enumerate(_archive_layers(source, fmt)):
                with opener() as f:
                    layer_dirs.append(_unpack_layer(store, f, size,
                                                    f"layer {i + 1}", progress))
        progress("committing", 0, 0)
        record = store.commit_image(name, layer_dirs, str(source), fmt, replace=replace)
    except BaseException:
        for d in layer_dirs:
            _rmtree(d)
        raise
    log.info("image.imported", name=name, format=fmt, layers=len(record.layer_ids),
             size=record.size_bytes)
    return record


def _import_directory(store: Store, source: Path, progress: Progress) -> Path:
    dst = store.new_tmp_dir()
    progress("copying directory", 0, 0)
    # --reflink=auto: a source on the same XFS shares blocks instead of copying.
    res = subprocess.run(["cp", "-a", "--reflink=auto", f"{source}/.", f"{dst}/"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        _rmtree(dst)
        raise InvalidArgument(f"copying {source} failed: {res.stderr.strip()[:500]}")
    _convert_whiteouts(dst)
    return dst


def _compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        return _magic(f.read(6))


def _magic(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


class _Peek:
    """Wrap a stream so its first bytes can be inspected and then re-read."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.head = f.read(6)

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.f.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out + (self.f.read(n - len(out)) if len(out) < n else b"")
        return self.f.read(n)


def _unpack_layer(store: Store, raw: BinaryIO, total: int, phase: str,
                  progress: Progress) -> Path:
    """Unpack one (possibly compressed) layer tarball into a new tmp dir."""
    dst = store.new_tmp_dir()
    peek = _Peek(raw)
    kind = _magic(peek.head)
    counted = _Counting(peek, total, phase, progress)
    if kind == "gzip":
        stream: BinaryIO = gzip.GzipFile(fileobj=counted)  # type: ignore[arg-type]
    elif kind == "xz":
        stream = lzma.LZMAFile(counted)  # type: ignore[arg-type]
    else:
        stream = counted  # type: ignore[assignment]
    # zstd has no stdlib module: tar decompresses it (through the zstd binary).
    tar = subprocess.Popen(
        ["tar", "-x", "-f", "-", "-C", str(dst), "--numeric-owner", "--same-permissions",
         "--same-owner", "--xattrs", "--xattrs-include=*", "--no-overwrite-dir",
         *(["--zstd"] if kind == "zstd" else [])],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdin is not None
    try:
        while chunk := stream.read(CHUNK):
            tar.stdin.write(chunk)
        tar.stdin.close()
    except BrokenPipeError:
        pass
    except (OSError, EOFError, lzma.LZMAError) as e:
        tar.kill()
        tar.wait()
        _rmtree(dst)
        raise InvalidArgument(f"{phase}: cannot decompress: {e}") from e
    err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
    if tar.wait() != 0:
        _rmtree(dst)
        raise InvalidArgument(f"{phase}: not a valid tar archive: {err.strip()[:500]}")
    progress(phase, total, total)
    _convert_whiteouts(dst)
    return dst


class _Counting:
    def __init__(self, f, total: int, phase: str, progress: Progress):
        self.f, self.total, self.phase, self.progress = f, total, phase, progress
        self.done = 0
        self._last = -1

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.done += len(data)
        step = self.done * 50 // max(self.total, 1)  # ~50 reports per layer
        if step != self._last:
            self._last = step
            self.progress(self.phase, self.done, self.total)
        return data


def _convert_whiteouts(root: Path) -> None:
    """OCI whiteouts (.wh.NAME, .wh..wh..opq) -> overlayfs (0:0 char dev, opaque xattr)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            if not n.startswith(WHITEOUT_PREFIX):
                continue
            p = os.path.join(dirpath, n)
            if n == OPAQUE_MARKER:
                os.unlink(p)
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
                continue
            target = os.path.join(dirpath, n[len(WHITEOUT_PREFIX):])
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            if os.path.lexists(target):
                shutil.rmtree(target) if os.path.isdir(target) else os.unlink(target)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))


# ---- docker save / OCI -----------------------------------------------------------------

def _archive_layers(source: Path, fmt: str) -> list[tuple[Callable[[], BinaryIO], int]]:
    """(opener, size) per layer, bottom first, for a docker/OCI archive or OCI dir."""
    if source.is_dir():
        def read(rel: str) -> bytes:
            return (source / rel).read_bytes()

        def opener_for(rel: str) -> tuple[Callable[[], BinaryIO], int]:
            p = source / rel
            return (lambda: open(p, "rb")), p.stat().st_size
    else:
        tf = tarfile.open(source)
        members = {m.name.lstrip("./"): m for m in tf.getmembers()}

        def read(rel: str) -> bytes:
            m = members.get(rel)
            if m is None:
                raise InvalidArgument(f"{source}: archive lacks {rel}")
            f = tf.extractfile(m)
            assert f is not None
            return f.read()

        def opener_for(rel: str) -> tuple[Callable[[], BinaryIO], int]:
            m = members.get(rel)
            if m is None:
                raise InvalidArgument(f"{source}: archive lacks {rel}")
            # Follow symlinked layers (docker save links duplicate layers).
            while m.issym():
                target = os.path.normpath(os.path.join(os.path.dirname(rel), m.linkname))
                m = members[target]
            return (lambda m=m: tf.extractfile(m)), m.size  # type: ignore[misc]

    try:
        if fmt == "docker-archive":
            manifest = json.loads(read("manifest.json"))
            if not manifest:
                raise InvalidArgument(f"{source}: empty manifest.json")
            return [opener_for(rel) for rel in manifest[0]["Layers"]]
        index = json.loads(read("index.json"))
        desc = index["manifests"][0]
        while desc["mediaType"].endswith("image.index.v1+json"):  # nested index
            desc = json.loads(read(_blob(desc)))["manifests"][0]
        manifest = json.loads(read(_blob(desc)))
        return [opener_for(_blob(layer)) for layer in manifest["layers"]]
    except (KeyError, IndexError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{source}: malformed {fmt} metadata: {e!r}") from e


def _blob(desc: dict) -> str:
    algo, _, digest = desc["digest"].partition(":")
    return f"blobs/{algo}/{digest}"
