"""Image import: rootfs tarballs, directories, `docker save` archives, OCI layouts.

Each source becomes one or more finished layer directories in the store's tmp area, which
`Store.commit_image` then renames into place in one transaction. OCI/Docker whiteouts
(`.wh.NAME`, `.wh..wh..opq`) become overlayfs whiteouts (0:0 character devices, the opaque
xattr) as the entries are written.

An image is hostile input. Whatever it contains, an import either fails with
`InvalidArgument`, leaving no layer and nothing in store/tmp, or writes only below the layer
directory it is building:

- Every entry is written by `_LayerWriter`, relative to an fd of that layer's root: its
  parent directory is opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) (missing
  ones are made one component at a time with O_NOFOLLOW), the entry itself with *at() calls
  on one name that never follow a symlink. A symlink the image itself made is never
  followed either: an entry below one (`a -> /etc`, then `a/passwd`) is refused.
- Refused: absolute names and `..` components (entry names, hardlink targets, names and
  symlinks inside docker/OCI archives, OCI digests), hardlinks to directories, to what is
  missing or through symlinks, a layer root that is not a directory, whiteouts naming `.`,
  `..`, nothing or another whiteout, or that are not plain files, paths deeper than
  MAX_PATH_DEPTH, sparse files and entry types other than files, directories, symlinks,
  hardlinks, FIFOs and devices, symlink loops in archives, OCI index cycles or nesting
  deeper than MAX_INDEX_DEPTH, archive members and blobs that are not regular files (a
  FIFO would block the import), metadata JSON over MAX_JSON_BYTES, and any image of more
  than `max_image_bytes` of file data or `max_image_entries` entries (inodes) in all its
  layers together (the daemon's --max-image-bytes / --max-image-entries).
- Tar headers are parsed by `tarfile` with `_SafeTarInfo`: extended headers (pax, GNU long
  names) are bounded in size and in number per member and parsed in linear time (Python
  3.11's own pax parser backtracks quadratically), and a corrupt header after the first one
  is an error, not a silent end of the archive.
- Character and block devices are **dropped**, and the import says which (a progress
  message whose phase starts with "warning:", and the daemon log). A device node in a lower
  layer would let whoever can open it in the sandbox reach a host device; refusing the
  image instead would reject real images (debootstrap and `docker export` tarballs carry
  /dev/null & co.), and a sandbox gets its own /dev from init anyway. FIFOs are kept: they
  reach nothing outside. Overlay xattrs (trusted.overlay.*, user.overlay.*) are dropped
  too: only the importer writes overlay metadata.
- A host directory source is read the same way: walked by fds without following symlinks
  (they are copied as symlinks), regular files opened by O_PATH and checked before they are
  read, not crossing into other mounts.

`tarfile.extractall(filter="data")` is not used: it resolves names with os.path.realpath
(following symlinks through the host's namespace, racy), refuses devices outright, and
knows nothing of whiteouts or limits.
"""

from __future__ import annotations

import errno
import gzip
import json
import lzma
import os
import posixpath
import re
import stat
import subprocess
import tarfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import structlog

from deltabox.host import linux
from deltabox.config import Config
from deltabox.core.deltafs import (OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, open_beneath, proc_fd_path,
                              remove_tree_contents, walk_tree)
from deltabox.errors import ImageNotFound, InvalidArgument, ResourceExhausted
from deltabox.store.metadata import ImageRecord, Store, _rmtree, validate_name

__all__ = ["import_image", "detect_format", "Progress", "ImportLimits"]

log = structlog.get_logger("deltabox.core.images")

Progress = Callable[[str, int, int], None]  # (phase, done_bytes, total_bytes)
CHUNK = 1 << 20
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_META_BYTES = 1 << 20        # one pax header or GNU long name (an xattr value is <= 64 KiB)
MAX_META_CHAIN = 8              # extended headers before one member
MAX_GLOBAL_PAX_BYTES = 1 << 20  # all global pax headers of one archive
MAX_PATH_DEPTH = 256            # directories in an entry's path
MAX_LAYERS = 128
MAX_INDEX_DEPTH = 8             # OCI index -> index -> ... -> manifest
MAX_JSON_BYTES = 16 << 20       # manifest.json, index.json, manifest and config blobs
MAX_LINK_HOPS = 16              # symlinks/hardlinks followed to find an archive member
MAX_ARCHIVE_MEMBERS = 100_000   # members of a docker-save/OCI tar (layers are members)
USER_OVERLAY_XATTR_PREFIX = "user.overlay."
_BENEATH = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_MAGICLINKS
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CONTENT_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                   errno.ENOENT, errno.EINVAL, errno.EMLINK, errno.EXDEV, errno.ENOTEMPTY,
                   errno.EPERM, errno.E2BIG, errno.ERANGE}


# ---- limits -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportLimits:
    """What one import may write, all layers together (Config.max_image_*)."""
    max_bytes: int = Config.max_image_bytes
    max_entries: int = Config.max_image_entries

    def __post_init__(self):
        if self.max_bytes <= 0 or self.max_entries <= 0:
            raise ValueError(f"image import limits must be positive (--max-image-bytes "
                             f"{self.max_bytes}, --max-image-entries {self.max_entries})")

    @classmethod
    def from_config(cls, cfg: Config) -> "ImportLimits":
        return cls(cfg.max_image_bytes, cfg.max_image_entries)


class _Budget:
    """Bytes and entries an import has written, all its layers together, and its limits."""

    def __init__(self, limits: ImportLimits):
        self.limits = limits
        self.bytes = 0
        self.entries = 0
        self.stream_bytes = 0
        # Tar headers, padding and extended headers are not file data; this bounds them.
        self.max_stream_bytes = limits.max_bytes + 2048 * limits.max_entries + (16 << 20)

    def entry(self, where: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise InvalidArgument(
                f"{where}: the image has more than {self.limits.max_entries:,} entries "
                "(the daemon's --max-image-entries); import refused")

    def data(self, where: str, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_bytes:
            raise InvalidArgument(
                f"{where}: the image has more than {_human(self.limits.max_bytes)} of file "
                "data (the daemon's --max-image-bytes); import refused")

    def stream(self, n: int) -> None:
        self.stream_bytes += n
        if self.stream_bytes > self.max_stream_bytes:
            raise InvalidArgument(
                f"the image's tar streams exceed {_human(self.max_stream_bytes)} (the "
                "daemon's --max-image-bytes plus headers); import refused")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- entry points ---------------------------------------------------------------------------

def detect_format(source: Path) -> str:
    """'dir', 'oci', 'docker-archive' or 'tar'."""
    if source.is_dir():
        if os.path.lexists(source / "oci-layout") and os.path.lexists(source / "index.json"):
            return "oci"
        return "dir"
    if not source.is_file():
        raise ImageNotFound(f"image source {source} does not exist")
    if _compression(source) is None:
        names = _top_level_names(source, {"manifest.json", "oci-layout", "index.json"})
        if "manifest.json" in names:
            return "docker-archive"
        if "oci-layout" in names and "index.json" in names:
            return "oci"
    return "tar"


def import_image(store: Store, name: str, source: Path, progress: Progress,
                 replace: bool = False, limits: ImportLimits | None = None) -> ImageRecord:
    """Import `source` as image `name`.

    On success the image is recorded with its layers. On failure nothing is left: no
    record, no layer, nothing in store/tmp. A hostile or malformed image fails with
    InvalidArgument naming the entry and the reason (see the module's docstring)."""
    validate_name(name, "image")
    source = source.resolve()
    fmt = detect_format(source)
    budget = _Budget(limits or ImportLimits())
    layer_dirs: list[Path] = []
    try:
        if fmt == "dir":
            _import_directory(store, source, budget, progress, layer_dirs)
        elif fmt == "tar":
            total = source.stat().st_size
            with open(source, "rb") as f:
                _unpack_layer(store, f, total, "rootfs", budget, progress, layer_dirs)
        else:
            with _open_archive(source) as archive:
                layers = (_docker_layers(archive) if fmt == "docker-archive"
                          else _oci_layers(archive))
                for i, rel in enumerate(layers):
                    f, size = archive.open_member(rel)
                    with f:
                        _unpack_layer(store, f, size, f"layer {i + 1}", budget, progress,
                                      layer_dirs)
        progress("committing", 0, 0)
        record = store.commit_image(name, layer_dirs, str(source), fmt, replace=replace)
    except BaseException:
        for d in layer_dirs:
            _discard(d)
        raise
    log.info("image.imported", name=name, format=fmt, layers=len(record.layer_ids),
             size=record.size_bytes, entries=budget.entries)
    return record


def _discard(layer: Path) -> None:
    """Remove a half-built layer; without recursion (it may be deep) nor following links."""
    try:
        fd = os.open(layer, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        remove_tree_contents(fd)
    finally:
        os.close(fd)
    _rmtree(layer)


# ---- writing one layer ----------------------------------------------------------------------

@dataclass
class _Entry:
    """One entry of a layer, from a tar member or a host directory."""
    name: str
    kind: str  # file, dir, symlink, hardlink, fifo, chardev, blockdev, socket
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    linkname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _show(name: str) -> str:
    """An untrusted name for a message: quoted, escaped (valid UTF-8), at most 200 chars."""
    return repr(name[:200]) + ("..." if len(name) > 200 else "")


def _components(name: str, where: str, what: str = "entry") -> tuple[str, ...]:
    """The path's components below the layer root; refuses what could leave it."""
    if "\0" in name:
        raise InvalidArgument(f"{where}: {what} {_show(name)} contains a NUL byte")
    if name.startswith("/"):
        raise InvalidArgument(f"{where}: {what} {_show(name)} is an absolute path; image "
                              "entries must be relative to the image's root")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{where}: {what} {_show(name)} has a '..' component")
    if len(parts) > MAX_PATH_DEPTH + 1:
        raise InvalidArgument(f"{where}: {what} {_show(name)} is nested deeper than "
                              f"{MAX_PATH_DEPTH} directories")
    return parts


class _LayerWriter:
    """Writes entries below one layer directory, never outside it (see the module doc)."""

    def __init__(self, root: Path, phase: str, budget: _Budget):
        self.phase = phase
        self.budget = budget
        self.root_fd = os.open(root, _DIR_FLAGS)
        os.fchmod(self.root_fd, 0o755)  # mkdtemp made it 0700; a "./" entry may change it
        self.dropped: list[str] = []               # devices (and links to them), sockets
        self.dropped_xattrs: set[str] = set()
        self.failed_xattrs: set[str] = set()
        self._dropped_paths: set[tuple[str, ...]] = set()
        self._whiteouts: set[tuple[str, ...]] = set()  # 0:0 devices this layer made
        self._dir_times: list[tuple[tuple[str, ...], int]] = []

    def __enter__(self) -> "_LayerWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._restore_dir_times()
        finally:
            os.close(self.root_fd)

    def warnings(self) -> list[str]:
        out = []
        if self.dropped:
            names = ", ".join(_show(n)[1:-1] for n in self.dropped[:20])
            names += ", ..." if len(self.dropped) > 20 else ""
            out.append(f"warning: {self.phase}: dropped {len(self.dropped)} device node(s) "
                       f"and socket(s), which images may not contain: {names}")
        if self.dropped_xattrs:
            out.append(f"warning: {self.phase}: dropped overlay xattrs "
                       f"{', '.join(sorted(self.dropped_xattrs))}")
        if self.failed_xattrs:
            out.append(f"warning: {self.phase}: could not set xattrs "
                       f"{', '.join(sorted(self.failed_xattrs)[:20])}")
        return out

    # -- entries --

    def add(self, e: _Entry, data: Callable[[int], None] | None = None) -> None:
        """Write one entry; `data(fd)` fills a regular file."""
        where = f"{self.phase}: {_show(e.name)}"
        parts = _components(e.name, self.phase)
        try:
            if not parts:
                if e.kind != "dir":
                    raise InvalidArgument(f"{where}: the image's root must be a directory, "
                                          f"not a {e.kind}")
                self._meta_fd(self.root_fd, e)
                self._dir_times.append(((), e.mtime_ns))
                return
            for p in parts[:-1]:
                if p.startswith(WHITEOUT_PREFIX):
                    raise InvalidArgument(f"{where}: a whiteout name ({_show(p)}) used as a "
                                          "directory")
            if parts[-1].startswith(WHITEOUT_PREFIX):
                self._whiteout(parts, e, where)
            elif e.kind in ("chardev", "blockdev", "socket"):
                self._drop(parts)
            elif e.kind == "hardlink":
                self._hardlink(parts, e, where)
            else:
                self._create(parts, e, data, where)
        except OSError as err:
            mapped = _entry_error(where, err)
            if mapped is err:
                raise
            raise mapped from err
        except ValueError as err:  # a NUL in a symlink target or an xattr name
            raise InvalidArgument(f"{where}: {err}") from err

    def _drop(self, parts: tuple[str, ...]) -> None:
        self.dropped.append("/".join(parts))
        self._dropped_paths.add(parts)

    def _create(self, parts, e: _Entry, data, where: str) -> None:
        pfd = self._parent(parts, where)
        leaf = parts[-1]
        try:
            was = self._clear(pfd, parts, keep_dir=e.kind == "dir")
            if e.kind == "dir":
                if was != "dir":
                    os.mkdir(leaf, 0o700, dir_fd=pfd)
                fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self._meta_fd(fd, e)
                    if was == "whiteout":  # deleted below, made again here: hide the lower one
                        os.setxattr(fd, OPAQUE_XATTR, b"y")
                finally:
                    os.close(fd)
                self._dir_times.append((parts, e.mtime_ns))
            elif e.kind == "file":
                fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                             os.O_CLOEXEC, 0o600, dir_fd=pfd)
                try:
                    if data is not None:
                        data(fd)
                    self._meta_fd(fd, e)
                    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
                finally:
                    os.close(fd)
            elif e.kind in ("symlink", "fifo"):
                if e.kind == "symlink":
                    if not e.linkname:
                        raise InvalidArgument(f"{where}: a symlink with an empty target")
                    os.symlink(e.linkname, leaf, dir_fd=pfd)
                else:
                    os.mkfifo(leaf, 0o600, dir_fd=pfd)
                # *at() calls on one name, not following it; chmod only for the FIFO
                # (we made it: no symlink can be there).
                os.chown(leaf, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
                if e.kind == "fifo":
                    os.chmod(leaf, e.mode, dir_fd=pfd)
                self._xattrs(proc_fd_path(pfd, leaf), e, follow=False)
                os.utime(leaf, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
            else:
                raise InvalidArgument(f"{where}: unsupported entry type {e.kind}")
        finally:
            os.close(pfd)

    def _hardlink(self, parts, e: _Entry, where: str) -> None:
        target = _components(e.linkname, where, "hardlink target")
        if not target:
            raise InvalidArgument(f"{where}: a hardlink to the image's root directory")
        if target in self._dropped_paths:
            self._drop(parts)
            return
        if target == parts:
            return  # a link to itself: the entry is already there
        tfd = self._parent(target, where, create=False,
                           what=f"hardlink target {_show(e.linkname)}")
        try:
            try:
                st = os.lstat(target[-1], dir_fd=tfd)
            except FileNotFoundError:
                raise InvalidArgument(f"{where}: hardlink target {_show(e.linkname)} is not in the "
                                      "image (hardlinks may only name earlier entries)") from None
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"{where}: hardlink to a directory ({_show(e.linkname)})")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
                    or stat.S_ISFIFO(st.st_mode)):
                raise InvalidArgument(f"{where}: hardlink to a whiteout ({_show(e.linkname)})")
            pfd = self._parent(parts, where)
            try:
                self._clear(pfd, parts, keep_dir=False)
                os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            finally:
                os.close(pfd)
        finally:
            os.close(tfd)

    def _whiteout(self, parts, e: _Entry, where: str) -> None:
        leaf = parts[-1]
        if e.kind != "file":
            raise InvalidArgument(f"{where}: whiteout entries must be empty regular files, "
                                  f"not a {e.kind}")
        pfd = self._parent(parts, where)
        try:
            if leaf == OPAQUE_MARKER:
                os.setxattr(pfd, OPAQUE_XATTR, b"y")
                return
            name = leaf[len(WHITEOUT_PREFIX):]
            if name in ("", ".", "..") or name.startswith(WHITEOUT_PREFIX):
                raise InvalidArgument(f"{where}: not a valid whiteout (it names {_show(name)})")
            try:
                st = os.lstat(name, dir_fd=pfd)
            except FileNotFoundError:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
                self._whiteouts.add(parts[:-1] + (name,))
                return
            # The name is also an entry of this layer: that entry stays (OCI: a whiteout
            # only deletes from lower layers); a directory hides the lower one's content.
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                try:
                    os.setxattr(fd, OPAQUE_XATTR, b"y")
                finally:
                    os.close(fd)
        finally:
            os.close(pfd)

    # -- paths --

    def _parent(self, parts: tuple[str, ...], where: str, create: bool = True,
                what: str = "") -> int:
        """An fd of the directory holding parts[-1], never reached through a symlink."""
        rel = "/".join(parts[:-1])
        if rel:
            try:
                return open_beneath(self.root_fd, rel, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                pass  # missing, or not a directory: the walk below makes or explains it
        return self._walk(parts[:-1], where, create, what)

    def _walk(self, dirs: tuple[str, ...], where: str, create: bool, what: str) -> int:
        fd = os.dup(self.root_fd)
        try:
            for i, p in enumerate(dirs):
                here = "/".join(dirs[:i + 1])
                try:
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise InvalidArgument(f"{where}: {what} is not in the image") from None
                    self.budget.entry(where)  # implicit directories are inodes too
                    os.mkdir(p, 0o755, dir_fd=fd)
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                except OSError as err:
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(p, dir_fd=fd)
                    if stat.S_ISLNK(st.st_mode):
                        raise InvalidArgument(
                            f"{where}: {what + ' ' if what else ''}goes through the "
                            f"symlink {_show(here)}; entries are never written through "
                            "symlinks"
                        ) from None
                    if create and dirs[:i + 1] in self._whiteouts:
                        # deleted below, then made a directory of this layer: opaque
                        os.unlink(p, dir_fd=fd)
                        self._whiteouts.discard(dirs[:i + 1])
                        os.mkdir(p, 0o755, dir_fd=fd)
                        nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                        os.fchmod(nfd, 0o755)
                        os.setxattr(nfd, OPAQUE_XATTR, b"y")
                    else:
                        raise InvalidArgument(f"{where}: {_show(here)} is not a "
                                              "directory") from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _clear(self, pfd: int, parts: tuple[str, ...], keep_dir: bool) -> str | None:
        """Make room for parts[-1]: a later entry replaces an earlier one (tar's rule).
        Returns 'dir' (kept), 'whiteout' (one of ours, removed), 'other' or None."""
        leaf = parts[-1]
        try:
            st = os.lstat(leaf, dir_fd=pfd)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return "dir"
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
            try:
                remove_tree_contents(fd)
            finally:
                os.close(fd)
            os.rmdir(leaf, dir_fd=pfd)
            return "other"
        os.unlink(leaf, dir_fd=pfd)
        if parts in self._whiteouts:
            self._whiteouts.discard(parts)
            return "whiteout"
        return "other"

    # -- metadata --

    def _meta_fd(self, fd: int, e: _Entry) -> None:
        os.fchown(fd, e.uid, e.gid)   # before chmod (it clears set-id bits) and xattrs
        os.fchmod(fd, e.mode)         # (it clears security.capability)
        self._xattrs(fd, e, follow=True)

    def _xattrs(self, target, e: _Entry, follow: bool) -> None:
        for key, value in e.xattrs.items():
            if key.startswith((OVERLAY_XATTR_PREFIX, USER_OVERLAY_XATTR_PREFIX)):
                self.dropped_xattrs.add(key)
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError:
                self.failed_xattrs.add(key)  # GNU tar warns and goes on too

    def _restore_dir_times(self) -> None:
        """Directory mtimes last: writing their entries changed them."""
        for parts, ns in self._dir_times:
            try:
                fd = (os.dup(self.root_fd) if not parts else
                      open_beneath(self.root_fd, "/".join(parts), os.O_RDONLY | os.O_DIRECTORY))
            except OSError:
                continue  # replaced by a later entry
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)


def _entry_error(where: str, err: OSError) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{where}: the store is full")
    if err.errno in _CONTENT_ERRNOS:
        return InvalidArgument(f"{where}: cannot be written: {os.strerror(err.errno)}")
    return err


def _report(writer: _LayerWriter, progress: Progress) -> None:
    for text in writer.warnings():
        progress(text, 0, 0)
    if writer.dropped:
        log.warning("image.entries_dropped", layer=writer.phase, count=len(writer.dropped),
                    names=writer.dropped[:100], reason="device nodes and sockets are not "
                    "allowed in images")
    if writer.dropped_xattrs or writer.failed_xattrs:
        log.warning("image.xattrs_dropped", layer=writer.phase,
                    overlay=sorted(writer.dropped_xattrs), failed=sorted(writer.failed_xattrs))


# ---- tar layers -----------------------------------------------------------------------------

class _Malformed(InvalidArgument):
    """Raised inside tarfile's parsing: not a HeaderError, so tarfile cannot swallow it."""


_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
               tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class _SafeTarInfo(tarfile.TarInfo):
    """tarfile's header parsing with bounds (see the module's docstring)."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            # After the first member tarfile would take this for the end of the archive.
            raise _Malformed(f"not a valid tar archive (bad header: {e})") from None

    def _proc_member(self, tf):
        if self.type in _META_TYPES:
            if self.size > MAX_META_BYTES:
                raise _Malformed(f"extended tar header of {self.size:,} bytes (at most "
                                 f"{MAX_META_BYTES:,})")
            tf.dbx_chain += 1
            if tf.dbx_chain > MAX_META_CHAIN:
                raise _Malformed(f"more than {MAX_META_CHAIN} extended tar headers in a row")
            if tf.dbx_budget is not None:
                tf.dbx_budget.data("tar headers", self.size)
            if self.type == tarfile.XGLTYPE:
                tf.dbx_global += self.size
                if tf.dbx_global > MAX_GLOBAL_PAX_BYTES:
                    raise _Malformed("global pax headers larger than "
                                     f"{MAX_GLOBAL_PAX_BYTES:,} bytes")
        else:
            tf.dbx_chain = 0
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise _Malformed(f"{_show(self.name)}: sparse files are not supported")
        return super()._proc_member(tf)

    def _proc_pax(self, tf):
        """tarfile's own _proc_pax (as in 3.11 to 3.13) with a linear-time record parser
        and no sparse files."""
        buf = tf.fileobj.read(self._block(self.size))
        pax_headers = tf.pax_headers if self.type == tarfile.XGLTYPE else tf.pax_headers.copy()
        records = _pax_records(buf[:self.size])
        encoding = "utf-8"
        for key, value in records:
            if key == b"hdrcharset":
                pax_headers["hdrcharset"] = value.decode("utf-8", "replace")
                if value == b"BINARY":
                    encoding = tf.encoding
        for key, value in records:
            k = self._decode_pax_field(key, "utf-8", "utf-8", tf.errors)
            if k.startswith("GNU.sparse."):
                raise _Malformed("sparse files are not supported")
            if k in tarfile.PAX_NAME_FIELDS:
                v = self._decode_pax_field(value, encoding, tf.encoding, tf.errors)
            else:
                v = self._decode_pax_field(value, "utf-8", "utf-8", tf.errors)
            pax_headers[k] = v
        try:
            nxt = self.fromtarfile(tf)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            nxt._apply_pax_info(pax_headers, tf.encoding, tf.errors)
            nxt.offset = self.offset
            if nxt.size < 0:
                raise _Malformed(f"{_show(nxt.name)}: negative size")
            if "size" in pax_headers:
                offset = nxt.offset_data
                if nxt.isreg() or nxt.type not in tarfile.SUPPORTED_TYPES:
                    offset += nxt._block(nxt.size)
                tf.offset = offset
        return nxt


def _pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The "LENGTH KEY=VALUE\\n" records of a pax header, parsed in linear time."""
    out, pos = [], 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        if space <= pos or not data[pos:space].isdigit():
            raise _Malformed("not a valid tar archive (bad pax header record)")
        end = pos + int(data[pos:space])
        if end <= space + 2 or end > len(data) or data[end - 1] != 0x0A:
            raise _Malformed("not a valid tar archive (bad pax header record length)")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise _Malformed("not a valid tar archive (bad pax header record)")
        out.append((key, value))
        pos = end
    return out


class _SafeTarFile(tarfile.TarFile):
    tarinfo = _SafeTarInfo

    def __init__(self, *args, **kw):
        self.dbx_chain = 0
        self.dbx_global = 0
        self.dbx_budget: _Budget | None = None
        super().__init__(*args, **kw)


def _members(tf: _SafeTarFile) -> Iterator[tarfile.TarInfo]:
    """Members one by one, not kept (TarFile.__iter__ keeps them all in memory)."""
    while True:
        m = tf.next()
        tf.members.clear()
        if m is None:
            return
        yield m


_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)
_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
          tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
          tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "chardev", tarfile.BLKTYPE: "blockdev"}


def _entry_of(m: tarfile.TarInfo, phase: str) -> _Entry:
    kind = _KINDS.get(m.type)
    if kind is None:
        raise InvalidArgument(f"{phase}: {_show(m.name)}: unsupported tar entry type "
                              f"{m.type!r}")
    if m.size < 0:
        raise InvalidArgument(f"{phase}: {_show(m.name)}: negative size")
    for what, v in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= v < 0xFFFFFFFF:
            raise InvalidArgument(f"{phase}: {_show(m.name)}: {what} {v} is out of range")
    try:
        mtime_ns = max(min(int(m.mtime * 1_000_000_000), 2**63 - 1), -2**63)
    except (OverflowError, ValueError):
        mtime_ns = 0
    xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
              for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return _Entry(m.name, kind, m.mode & 0o7777, m.uid, m.gid, mtime_ns, m.linkname, xattrs)


def _unpack_layer(store: Store, raw: BinaryIO, total: int, phase: str, budget: _Budget,
                  progress: Progress, layer_dirs: list[Path]) -> None:
    """Unpack one (possibly compressed) layer tarball into a new tmp dir."""
    dst = store.new_tmp_dir()
    layer_dirs.append(dst)
    peek = _Peek(raw)
    kind = _magic(peek.head)
    counted = _Counting(peek, total, phase, progress)
    zstd = None
    if kind == "gzip":
        stream: BinaryIO = gzip.GzipFile(fileobj=counted)  # type: ignore[arg-type]
    elif kind == "xz":
        stream = lzma.LZMAFile(counted)  # type: ignore[arg-type]
    elif kind == "zstd":  # no stdlib module before 3.14: the zstd binary
        stream = zstd = _ZstdPipe(counted)  # type: ignore[assignment]
    else:
        stream = counted  # type: ignore[assignment]
    try:
        with _LayerWriter(dst, phase, budget) as writer:
            try:
                with _SafeTarFile.open(fileobj=_Bounded(stream, budget), mode="r|",
                                       encoding="utf-8", errors="surrogateescape") as tf:
                    tf.dbx_budget = budget
                    for m in _members(tf):
                        where = f"{phase}: {_show(m.name)}"
                        budget.entry(where)
                        if m.isreg() or m.size:
                            budget.data(where, max(m.size, 0))
                        e = _entry_of(m, phase)
                        writer.add(e, _copy_member(tf, m) if e.kind == "file" else None)
            except _Malformed as e:
                raise InvalidArgument(f"{phase}: {e.message}") from None
            except _TAR_ERRORS as e:
                raise InvalidArgument(f"{phase}: not a valid tar archive: {e}") from e
            except RecursionError as e:
                raise InvalidArgument(f"{phase}: tar headers nested too deeply") from e
            if zstd is not None:
                zstd.check(phase)
        _report(writer, progress)
    finally:
        if zstd is not None:
            zstd.close()
    progress(phase, total, total)


def _copy_member(tf: tarfile.TarFile, m: tarfile.TarInfo) -> Callable[[int], None]:
    def copy(fd: int) -> None:
        src = tf.extractfile(m)
        assert src is not None
        while chunk := src.read(CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
    return copy


class _Bounded:
    """Counts the decompressed tar stream against the budget (headers are not file data)."""

    def __init__(self, f, budget: _Budget):
        self.f, self.budget = f, budget

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.budget.stream(len(data))
        return data


class _ZstdPipe:
    """Decompress through `zstd -d`, fed from a thread."""

    def __init__(self, src):
        self.proc = subprocess.Popen(["zstd", "-d", "-c", "-q"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._feed, args=(src,), daemon=True)
        self.thread.start()

    def _feed(self, src) -> None:
        try:
            while chunk := src.read(CHUNK):
                self.proc.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as e:  # noqa: BLE001 -- re-raised by check()
            self.error = e
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def check(self, phase: str) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        self.thread.join()
        self.proc.stderr.close()


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


# ---- host directories -----------------------------------------------------------------------

def _import_directory(store: Store, source: Path, budget: _Budget, progress: Progress,
                      layer_dirs: list[Path]) -> None:
    dst = store.new_tmp_dir()
    layer_dirs.append(dst)
    phase = "directory"
    progress("copying directory", 0, 0)
    src_fd = os.open(source, _DIR_FLAGS)
    try:
        root_st = os.fstat(src_fd)
        links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path: hardlinks
        with _LayerWriter(dst, phase, budget) as writer:
            writer.add(_entry_of_stat(".", root_st, _read_xattrs(proc_fd_path(src_fd, "."))))
            for rel, st, dir_fd, name in walk_tree(src_fd):
                where = f"{phase}: {_show(rel)}"
                budget.entry(where)
                if st.st_dev != root_st.st_dev:
                    raise InvalidArgument(f"{where}: is a mount point (another filesystem); "
                                          "an image is imported from one filesystem only")
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(name, dir_fd=dir_fd)
                    e = _entry_of_stat(rel, st, _read_xattrs(proc_fd_path(dir_fd, name)), target)
                    writer.add(e)
                    continue
                e = _entry_of_stat(rel, st, _read_xattrs(proc_fd_path(dir_fd, name)))
                if e.kind == "file" and st.st_nlink > 1:
                    first = links.setdefault((st.st_dev, st.st_ino), rel)
                    if first != rel:
                        writer.add(_Entry(rel, "hardlink", linkname=first))
                        continue
                if e.kind == "file":
                    budget.data(where, st.st_size)
                    writer.add(e, _copy_host_file(dir_fd, name, st, where))
                else:
                    writer.add(e)
        _report(writer, progress)
    finally:
        os.close(src_fd)


def _entry_of_stat(rel: str, st: os.stat_result, xattrs: dict[str, bytes],
                   linkname: str = "") -> _Entry:
    fmt = stat.S_IFMT(st.st_mode)
    kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
            stat.S_IFSOCK: "socket"}[fmt]
    return _Entry(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                  linkname, xattrs)


def _read_xattrs(path: str) -> dict[str, bytes]:
    """Xattrs of the entry at `path` itself (l*xattr: a symlink is not followed)."""
    try:
        return {k: os.getxattr(path, k, follow_symlinks=False)
                for k in os.listxattr(path, follow_symlinks=False)}
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT):
            return {}
        raise


def _copy_host_file(dir_fd: int, name: str, st: os.stat_result,
                    where: str) -> Callable[[int], None]:
    def copy(dst: int) -> None:
        src = _reopen_regular(os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      dir_fd=dir_fd), where, st)
        try:
            try:
                linux.ficlone(src, dst)  # the same XFS: share the blocks
            except OSError:
                left = st.st_size
                while left > 0:
                    n = os.sendfile(dst, src, None, min(left, 1 << 30))
                    if n == 0:
                        break
                    left -= n
            if os.fstat(dst).st_size > st.st_size:  # it grew since it was counted
                os.ftruncate(dst, st.st_size)
        finally:
            os.close(src)
    return copy


def _reopen_regular(path_fd: int, where: str, expect: os.stat_result | None = None) -> int:
    """Open an O_PATH fd for reading, if it is a regular file (the same one, if `expect`):
    never opens a FIFO (it would block) or a device (it could act)."""
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{where}: not a regular file")
        if expect is not None and (st.st_ino, st.st_dev) != (expect.st_ino, expect.st_dev):
            raise InvalidArgument(f"{where}: changed while it was imported")
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


# ---- docker save / OCI ----------------------------------------------------------------------

class _Archive:
    """The files of a docker-save archive, an OCI archive or an OCI layout directory,
    found without leaving it: names are checked, symlinks followed only inside."""

    def __init__(self, source: Path):
        self.source = source

    def open_member(self, rel: str) -> tuple[BinaryIO, int]:
        raise NotImplementedError

    def read_json(self, rel: str, what: str | None = None):
        what = what or rel
        f, size = self.open_member(rel)
        with f:
            if size > MAX_JSON_BYTES:
                raise InvalidArgument(f"{self.source}: {what} is {size:,} bytes (metadata "
                                      f"is at most {MAX_JSON_BYTES:,})")
            data = f.read(MAX_JSON_BYTES + 1)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"{self.source}: malformed metadata: {what} is not valid "
                                  f"JSON ({str(e)[:100]})") from None

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _name(self, rel: str) -> str:
        if "\0" in rel or rel.startswith("/") or ".." in rel.split("/"):
            raise InvalidArgument(f"{self.source}: {_show(rel)} points outside the archive")
        name = posixpath.normpath(rel)
        if name in (".", ""):
            raise InvalidArgument(f"{self.source}: {_show(rel)} is not a file of the "
                                  "archive")
        return name


class _DirArchive(_Archive):
    def __init__(self, source: Path):
        super().__init__(source)
        self.fd = os.open(source, _DIR_FLAGS)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def open_member(self, rel: str) -> tuple[BinaryIO, int]:
        name = self._name(rel)
        where = f"{self.source}: {_show(name)}"
        try:
            # Symlinks inside the layout are followed; out of it (absolute, `..`) not.
            pfd = linux.openat2(self.fd, name, os.O_PATH, 0, _BENEATH)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise InvalidArgument(f"{where}: a symlink that points outside the "
                                      "image layout") from None
            if e.errno == errno.ELOOP:
                raise InvalidArgument(f"{where}: a symlink loop") from None
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise InvalidArgument(f"{self.source}: image layout lacks {_show(name)}"
                                      ) from None
            raise
        fd = _reopen_regular(pfd, where)
        f = os.fdopen(fd, "rb")
        return f, os.fstat(fd).st_size


class _TarArchive(_Archive):
    def __init__(self, source: Path):
        super().__init__(source)
        self.tf = _SafeTarFile.open(source, mode="r:", encoding="utf-8",
                                    errors="surrogateescape")
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for i, m in enumerate(_members(self.tf)):
                if i >= MAX_ARCHIVE_MEMBERS:
                    raise InvalidArgument(f"{source}: more than {MAX_ARCHIVE_MEMBERS:,} "
                                          "archive members")
                key = _member_key(m.name)
                if key is not None:
                    self.members[key] = m  # a later member of the same name wins
        except _TAR_ERRORS as e:
            self.tf.close()
            raise InvalidArgument(f"{source}: not a valid tar archive: {e}") from e
        except BaseException:
            self.tf.close()
            raise

    def __exit__(self, *exc) -> None:
        self.tf.close()

    def open_member(self, rel: str) -> tuple[BinaryIO, int]:
        name = self._name(rel)
        m = self.members.get(name)
        if m is None:
            raise InvalidArgument(f"{self.source}: archive lacks {_show(rel)}")
        for _ in range(MAX_LINK_HOPS):
            if m.issym():
                link = m.linkname
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
                if link.startswith("/") or target == ".." or target.startswith("../"):
                    raise InvalidArgument(f"{self.source}: {_show(name)} is a symlink that "
                                          f"points outside the archive ({_show(link)})")
            elif m.islnk():
                target = _member_key(m.linkname) or ""
            else:
                break
            name = target
            m = self.members.get(name)
            if m is None:
                raise InvalidArgument(f"{self.source}: archive lacks {_show(name)} (a link "
                                      f"target of {_show(rel)})")
        else:
            raise InvalidArgument(f"{self.source}: {_show(rel)}: more than {MAX_LINK_HOPS} "
                                  "symlinks/hardlinks to follow (a loop)")
        if not m.isreg():
            raise InvalidArgument(f"{self.source}: {_show(rel)} is not a regular file")
        f = self.tf.extractfile(m)
        assert f is not None
        return f, m.size


def _member_key(name: str) -> str | None:
    """An archive member's name as manifests name it; None if no manifest can."""
    while name.startswith("./"):
        name = name[2:]
    if not name or name.startswith("/") or ".." in name.split("/"):
        return None
    return posixpath.normpath(name)


def _top_level_names(source: Path, wanted: set[str]) -> set[str]:
    """Which of `wanted` an uncompressed tar has (by its headers; unreadable: none)."""
    found: set[str] = set()
    try:
        with _SafeTarFile.open(source, mode="r:") as tf:
            for i, m in enumerate(_members(tf)):
                if i >= MAX_ARCHIVE_MEMBERS:
                    return set()  # no docker/OCI archive has that many: a rootfs
                key = _member_key(m.name)
                if key in wanted:
                    found.add(key)
    except (*_TAR_ERRORS, InvalidArgument, RecursionError):
        return set()  # not an archive of ours: unpacking it as a rootfs will say why
    return found


def _open_archive(source: Path) -> _Archive:
    return _DirArchive(source) if source.is_dir() else _TarArchive(source)


def _docker_layers(archive: _Archive) -> list[str]:
    manifest = archive.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
        raise InvalidArgument(f"{archive.source}: malformed docker-archive metadata: "
                              "manifest.json is not a list of images")
    layers = manifest[0].get("Layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise InvalidArgument(f"{archive.source}: malformed docker-archive metadata: "
                              "manifest.json's Layers is not a list of paths")
    return _check_layer_count(archive, layers)


_INDEX_KEY = "manifests"


def _oci_layers(archive: _Archive) -> list[str]:
    """Layer blobs of the first image of the layout: index -> (index ->)* manifest."""
    doc = archive.read_json("index.json")
    seen: set[str] = set()
    for _ in range(MAX_INDEX_DEPTH + 1):
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{archive.source}: malformed oci metadata: not an object")
        if _INDEX_KEY in doc:
            entries = doc[_INDEX_KEY]
            if not isinstance(entries, list) or not entries:
                raise InvalidArgument(f"{archive.source}: malformed oci metadata: an index "
                                      "without manifests")
            path = _blob(archive, entries[0])
            if path in seen:
                raise InvalidArgument(f"{archive.source}: malformed oci metadata: an index "
                                      f"cycle ({path} is reached twice)")
            seen.add(path)
            doc = archive.read_json(path)
            continue
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise InvalidArgument(f"{archive.source}: malformed oci metadata: a manifest "
                                  "without layers")
        return _check_layer_count(archive, [_blob(archive, d) for d in layers])
    raise InvalidArgument(f"{archive.source}: malformed oci metadata: indexes nested deeper "
                          f"than {MAX_INDEX_DEPTH}")


# OCI image-spec descriptor digests: algorithm ":" encoded, neither can hold "/" or "..".
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def _blob(archive: _Archive, desc) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"{archive.source}: malformed oci metadata: invalid digest "
                              f"{str(digest)[:100]!r}")
    algo, _, encoded = digest.partition(":")
    return f"blobs/{algo}/{encoded}"


def _check_layer_count(archive: _Archive, layers: list[str]) -> list[str]:
    if len(layers) > MAX_LAYERS:
        raise InvalidArgument(f"{archive.source}: {len(layers)} layers (at most {MAX_LAYERS})")
    return layers
