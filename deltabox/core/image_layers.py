"""Writing one image layer: `LayerWriter` puts an image's entries below the layer
directory it is building and nowhere else, turning OCI/Docker whiteouts into overlayfs
ones as it goes; `ImportBudget` counts what an import wrote against its `ImportLimits`.

Everything a writer is handed comes from a hostile image (`deltabox.core.image_formats`
parses tar streams and archives into `Entry`s, `deltabox.core.images` walks host
directories): the rules it enforces are listed in `deltabox.core.images`' docstring.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from deltabox.config import Config
from deltabox.core.fdwalk import (OPAQUE_XATTR, OVERLAY_XATTR_PREFIX, open_beneath, proc_fd_path,
                                  remove_tree_contents)
from deltabox.errors import InvalidArgument, ResourceExhausted
from deltabox.units import human_bytes

__all__ = ["ImportLimits", "ImportBudget", "Progress", "Entry", "LayerWriter", "shown",
           "report_warnings", "MAX_PATH_DEPTH"]

log = structlog.get_logger("deltabox.core.images")

Progress = Callable[[str, int, int], None]  # (phase, done_bytes, total_bytes)
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_PATH_DEPTH = 256            # directories in an entry's path
USER_OVERLAY_XATTR_PREFIX = "user.overlay."
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


class ImportBudget:
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
                f"{where}: the image has more than {human_bytes(self.limits.max_bytes)} of file "
                "data (the daemon's --max-image-bytes); import refused")

    def stream(self, n: int) -> None:
        self.stream_bytes += n
        if self.stream_bytes > self.max_stream_bytes:
            raise InvalidArgument(
                f"the image's tar streams exceed {human_bytes(self.max_stream_bytes)} (the "
                "daemon's --max-image-bytes plus headers); import refused")


# ---- writing one layer ----------------------------------------------------------------------

@dataclass
class Entry:
    """One entry of a layer, from a tar member or a host directory."""
    name: str
    kind: str  # file, dir, symlink, hardlink, fifo, chardev, blockdev, socket
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    linkname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


def shown(name: str) -> str:
    """An untrusted name for a message: quoted, escaped (valid UTF-8), at most 200 chars."""
    return repr(name[:200]) + ("..." if len(name) > 200 else "")


def _components(name: str, where: str, what: str = "entry") -> tuple[str, ...]:
    """The path's components below the layer root; refuses what could leave it."""
    if "\0" in name:
        raise InvalidArgument(f"{where}: {what} {shown(name)} contains a NUL byte")
    if name.startswith("/"):
        raise InvalidArgument(f"{where}: {what} {shown(name)} is an absolute path; image "
                              "entries must be relative to the image's root")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{where}: {what} {shown(name)} has a '..' component")
    if len(parts) > MAX_PATH_DEPTH + 1:
        raise InvalidArgument(f"{where}: {what} {shown(name)} is nested deeper than "
                              f"{MAX_PATH_DEPTH} directories")
    return parts


class LayerWriter:
    """Writes entries below one layer directory, never outside it (see the module doc)."""

    def __init__(self, root: Path, phase: str, budget: ImportBudget):
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

    def __enter__(self) -> "LayerWriter":
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
            names = ", ".join(shown(n)[1:-1] for n in self.dropped[:20])
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

    def add(self, e: Entry, data: Callable[[int], None] | None = None) -> None:
        """Write one entry; `data(fd)` fills a regular file."""
        where = f"{self.phase}: {shown(e.name)}"
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
                    raise InvalidArgument(f"{where}: a whiteout name ({shown(p)}) used as a "
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

    def _create(self, parts, e: Entry, data, where: str) -> None:
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

    def _hardlink(self, parts, e: Entry, where: str) -> None:
        target = _components(e.linkname, where, "hardlink target")
        if not target:
            raise InvalidArgument(f"{where}: a hardlink to the image's root directory")
        if target in self._dropped_paths:
            self._drop(parts)
            return
        if target == parts:
            return  # a link to itself: the entry is already there
        tfd = self._parent(target, where, create=False,
                           what=f"hardlink target {shown(e.linkname)}")
        try:
            try:
                st = os.lstat(target[-1], dir_fd=tfd)
            except FileNotFoundError:
                raise InvalidArgument(f"{where}: hardlink target {shown(e.linkname)} is not in the "
                                      "image (hardlinks may only name earlier entries)") from None
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"{where}: hardlink to a directory ({shown(e.linkname)})")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
                    or stat.S_ISFIFO(st.st_mode)):
                raise InvalidArgument(f"{where}: hardlink to a whiteout ({shown(e.linkname)})")
            pfd = self._parent(parts, where)
            try:
                self._clear(pfd, parts, keep_dir=False)
                os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            finally:
                os.close(pfd)
        finally:
            os.close(tfd)

    def _whiteout(self, parts, e: Entry, where: str) -> None:
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
                raise InvalidArgument(f"{where}: not a valid whiteout (it names {shown(name)})")
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
                            f"symlink {shown(here)}; entries are never written through "
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
                        raise InvalidArgument(f"{where}: {shown(here)} is not a "
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

    def _meta_fd(self, fd: int, e: Entry) -> None:
        os.fchown(fd, e.uid, e.gid)   # before chmod (it clears set-id bits) and xattrs
        os.fchmod(fd, e.mode)         # (it clears security.capability)
        self._xattrs(fd, e, follow=True)

    def _xattrs(self, target, e: Entry, follow: bool) -> None:
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


def report_warnings(writer: LayerWriter, progress: Progress) -> None:
    for text in writer.warnings():
        progress(text, 0, 0)
    if writer.dropped:
        log.warning("image.entries_dropped", layer=writer.phase, count=len(writer.dropped),
                    names=writer.dropped[:100], reason="device nodes and sockets are not "
                    "allowed in images")
    if writer.dropped_xattrs or writer.failed_xattrs:
        log.warning("image.xattrs_dropped", layer=writer.phase,
                    overlay=sorted(writer.dropped_xattrs), failed=sorted(writer.failed_xattrs))
