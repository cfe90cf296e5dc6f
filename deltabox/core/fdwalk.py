"""Walking trees that a sandbox wrote, fd-relative: never following a symlink, never
leaving the tree.

Uppers, layers and a host directory being imported hold whatever root in a sandbox (or an
image) put there, so everything below their roots is hostile; see docs/security.md. These
are the primitives that DeltaFS (`deltabox.core.deltafs`), the image importer
(`deltabox.core.images`), file access (`deltabox.core.files`) and the store
(`deltabox.store.layout`) walk, open, copy and delete such trees with: `open_beneath`,
`proc_fd_path`, `walk_tree`, `remove_tree_contents`, `Tree` (a tree opened once by its
root, with its entries cached) and `copy_dir_meta`.

The overlay-format names (`OVERLAY_XATTR_PREFIX`, `OPAQUE_XATTR`) live here too: a walk
reads the opaque mark of every directory it meets.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from deltabox.errors import FailedPrecondition
from deltabox.host import linux

__all__ = ["OVERLAY_XATTR_PREFIX", "OPAQUE_XATTR", "MAX_WALK_PATH", "open_beneath",
           "proc_fd_path", "walk_tree", "remove_tree_contents", "Tree", "copy_dir_meta",
           "data_extents"]

OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"

# Why these walks are safe
# ------------------------
# Uppers and layers are written by root inside a sandbox, so everything below their roots
# is hostile: a symlink to / (or /proc/1/root, or ../../..) where a directory was, and in a
# live upper one swapped in while the daemon walks it. Nothing here resolves a path below a
# tree's root through the host's namespace. A tree is opened once by its root (a directory
# the daemon made); below it, directories are opened by the kernel from that fd with
# openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), or from their parent's fd with
# O_NOFOLLOW, and entries are then reached with *at() calls on a single name, which never
# resolve further. A symlink met on the way gives ELOOP and the path counts as absent:
# what it named is not a directory any more.

_RESOLVE = linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS | linux.RESOLVE_NO_XDEV
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # not there, or not below a directory now
_PATH_CHUNK = 3800  # bytes of path per openat2 call: PATH_MAX is 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The longest relative path a walk enters (characters; twice PATH_MAX). A walk keeps every
# level's path, and its callers keep every entry's: a chain of directories D deep with
# long names would cost D^2 bytes of the daemon's memory -- outside any sandbox's
# cgroup -- at each checkpoint (3,000 levels of 250-character names: 2 GiB). Deeper is
# refused, naming the path: at 2 characters a level that is still 4,096 levels.
MAX_WALK_PATH = 8192


def open_beneath(dir_fd: int, rel: str, flags: int) -> int:
    """Open `rel` below the directory `dir_fd` without following any symlink (a final one
    too: with O_PATH|O_NOFOLLOW the link itself is opened, else ELOOP) and without
    leaving the tree. Paths longer than PATH_MAX are opened a chunk at a time."""
    if len(os.fsencode(rel)) < _PATH_CHUNK:
        return linux.openat2(dir_fd, rel or ".", flags, 0, _RESOLVE)
    parts = rel.split("/")
    fd, owned = dir_fd, False
    try:
        chunk: list[str] = []
        size = 0
        for part in parts[:-1]:
            n = len(os.fsencode(part)) + 1
            if chunk and size + n >= _PATH_CHUNK:
                nxt = linux.openat2(fd, "/".join(chunk), os.O_PATH | os.O_DIRECTORY, 0,
                                     _RESOLVE)
                if owned:
                    os.close(fd)
                fd, owned, chunk, size = nxt, True, [], 0
            chunk.append(part)
            size += n
        chunk.append(parts[-1])
        return linux.openat2(fd, "/".join(chunk), flags, 0, _RESOLVE)
    finally:
        if owned:
            os.close(fd)


def proc_fd_path(dir_fd: int, rel: str) -> str:
    """A name for `rel` (one component, or below directories opened beneath) in
    `dir_fd`, for the l*xattr calls that take paths only."""
    return f"/proc/self/fd/{dir_fd}/{rel}"


def data_extents(fd: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of the open regular file `fd` that hold data: the rest
    are holes (SEEK_DATA / SEEK_HOLE). A sparse file's size costs nothing to make: what a
    walk reads of it must follow what it holds, not what it claims."""
    out, off = [], 0
    while True:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past `off`
                return out
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        off = end


def _opaque_at(dir_fd: int, name: str) -> bool:
    """Does the directory `name` in `dir_fd` carry the opaque mark? (l*xattr on a single
    name below the fd's magic link: nothing is followed)"""
    try:
        return os.getxattr(proc_fd_path(dir_fd, name), OPAQUE_XATTR,
                           follow_symlinks=False) == b"y"
    except OSError:
        return False


def walk_tree(root_fd: int) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """Every entry below the directory `root_fd`, parents before children, as
    (relative path, lstat, fd of its directory, its name).

    No symlink is ever followed: each directory is opened from its parent's fd with
    O_NOFOLLOW|O_DIRECTORY, so one swapped for a symlink (or removed) since it was listed
    is skipped, never entered. One fd per level, so paths longer than PATH_MAX are fine;
    the yielded directory fd is valid until the next step of the walk."""
    stack: list[tuple[str, int, list[str]]] = []
    rel, fd = "", os.open(".", _DIR_FLAGS, dir_fd=root_fd)
    try:
        while True:
            subdirs: list[str] = []
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield (f"{rel}/{entry.name}" if rel else entry.name), st, fd, entry.name
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append(entry.name)
            stack.append((rel, fd, subdirs))
            fd = -1
            while stack and fd < 0:
                prel, pfd, pending = stack[-1]
                if not pending:
                    stack.pop()
                    os.close(pfd)
                    continue
                name = pending.pop()
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                except OSError as e:
                    if e.errno not in _GONE:
                        raise
                    continue
                rel = f"{prel}/{name}" if prel else name
                if len(rel) > MAX_WALK_PATH:
                    raise FailedPrecondition(
                        f"{rel[:120]!r}... is more than {MAX_WALK_PATH} characters of path below "
                        "its tree's root: DeltaBox does not checkpoint, compare or copy trees "
                        "nested this deep (remove it first)")
            if fd < 0:
                return
    finally:
        if fd >= 0:  # being listed, not on the stack yet
            os.close(fd)
        for _, sfd, _ in stack:
            os.close(sfd)


# The most directory levels `remove_tree_contents` holds open at once.
MAX_OPEN_LEVELS = 256


def remove_tree_contents(dir_fd: int) -> None:
    """Delete everything inside the directory `dir_fd`, never following a symlink (each
    subdirectory is opened from its parent's fd with O_NOFOLLOW) and without recursion:
    a sandbox can nest directories thousands of levels deep. At most MAX_OPEN_LEVELS fds
    at once, however deep: a directory met below that depth is first moved up to the
    top level (renameat on single names, nothing followed) and deleted from there --
    a tree deeper than the fd limit must not be undeletable (its branch left on disk,
    failing every later start-up's clean-up)."""
    stack: list[tuple[int, str, list[str]]] = []
    fd, name = os.open(".", _DIR_FLAGS, dir_fd=dir_fd), ""
    lifted = 0
    try:
        while True:
            if fd >= 0:
                subdirs = []
                with os.scandir(fd) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.name)
                        else:
                            _unlink_quiet(fd, entry.name)
                stack.append((fd, name, subdirs))
                fd = -1
            top, top_name, pending = stack[-1]
            if pending and len(stack) > MAX_OPEN_LEVELS:
                sub = pending.pop()
                lifted += 1
                up = f".deltabox-deleting-{os.getpid()}-{lifted}"
                try:
                    os.rename(sub, up, src_dir_fd=top, dst_dir_fd=stack[0][0])
                except FileNotFoundError:
                    continue
                stack[0][2].append(up)
                continue
            if pending:
                sub = pending.pop()
                try:
                    fd, name = os.open(sub, _DIR_FLAGS, dir_fd=top), sub
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):  # not a directory any more
                        _unlink_quiet(top, sub)
                    elif e.errno != errno.ENOENT:
                        raise
                continue
            stack.pop()
            os.close(top)
            if not stack:
                return
            os.rmdir(top_name, dir_fd=stack[-1][0])
    finally:
        if fd >= 0:
            os.close(fd)
        for sfd, _, _ in stack:
            os.close(sfd)


def _unlink_quiet(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class Tree:
    """A layer, or an upper, opened once by its root; everything below is reached from
    that fd (see above). Entries seen are remembered, so one diff or squash stats each
    path of a tree once and sees one state of a live upper for it."""

    KEEP = 64  # parent directory fds kept open (LRU): entries come grouped by directory

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._parents: OrderedDict[str, int] = OrderedDict()
        self._entries: dict[str, tuple[os.stat_result, bool] | None] = {}

    def close(self) -> None:
        for fd in self._parents.values():
            os.close(fd)
        self._parents.clear()
        os.close(self.fd)

    def at(self, rel: str) -> tuple[int, str]:
        """(fd of rel's directory, rel's last component) for *at() calls, which then
        cannot cross a symlink; ("root fd", ".") for the root. The fd stays valid for
        the next KEEP - 1 calls. Raises OSError (ELOOP, ENOTDIR, ENOENT) if the
        directory is not one (any more)."""
        parent, _, name = rel.rpartition("/")
        if not parent:
            return self.fd, name or "."
        fd = self._parents.get(parent)
        if fd is None:
            fd = open_beneath(self.fd, parent, os.O_PATH | os.O_DIRECTORY)
            self._parents[parent] = fd
            if len(self._parents) > self.KEEP:
                os.close(self._parents.popitem(last=False)[1])
        else:
            self._parents.move_to_end(parent)
        return fd, name

    def entry(self, rel: str) -> tuple[os.stat_result, bool] | None:
        """(lstat, opaque) of `rel`, or None if it is not in this tree (now)."""
        if rel in self._entries:
            return self._entries[rel]
        try:
            fd, name = self.at(rel)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _GONE:
                raise
            found = None
        else:
            found = (st, stat.S_ISDIR(st.st_mode) and _opaque_at(fd, name))
        self._entries[rel] = found
        return found

    def is_opaque(self, rel: str) -> bool:
        found = self.entry(rel)
        return found is not None and found[1]

    def listdir(self, rel: str) -> list[tuple[str, os.stat_result, bool]]:
        """(name, lstat, opaque) of each entry of the directory `rel`; [] if it is not a
        directory (any more)."""
        try:
            pfd, name = self.at(rel)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as e:
            if e.errno not in _GONE:
                raise
            return []
        out = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    opaque = stat.S_ISDIR(st.st_mode) and _opaque_at(fd, entry.name)
                    out.append((entry.name, st, opaque))
                    self._entries[f"{rel}/{entry.name}" if rel else entry.name] = (st, opaque)
        finally:
            os.close(fd)
        return out

    def walk(self) -> Iterator[tuple[str, os.stat_result, bool]]:
        """(path, lstat, opaque) of every entry below the root (see `walk_tree`)."""
        for rel, st, dir_fd, name in walk_tree(self.fd):
            opaque = stat.S_ISDIR(st.st_mode) and _opaque_at(dir_fd, name)
            self._entries[rel] = (st, opaque)
            yield rel, st, opaque

    def readlink(self, rel: str) -> str | None:
        try:
            fd, name = self.at(rel)
            return os.readlink(name, dir_fd=fd)
        except OSError as e:
            if e.errno not in _GONE + (errno.EINVAL,):
                raise
            return None

    def open_regular(self, rel: str) -> int | None:
        """A read fd of the regular file `rel`, or None if it is not one (now).
        O_NONBLOCK: a FIFO swapped in must not block a daemon thread."""
        try:
            fd, name = self.at(rel)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=fd)
        except OSError as e:
            if e.errno not in _GONE + (errno.ENXIO, errno.EACCES):
                raise
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd


def copy_dir_meta(src_parent: int, src_name: str, dst_parent: int, dst_name: str,
                  st: os.stat_result) -> None:
    """Give the directory `dst_name` (in `dst_parent`) the owner, mode, xattrs (but no
    overlay ones) and times of `src_name` (in `src_parent`), following no symlink."""
    os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_parent, follow_symlinks=False)
    os.chmod(dst_name, stat.S_IMODE(st.st_mode), dir_fd=dst_parent)
    src, dst = proc_fd_path(src_parent, src_name), proc_fd_path(dst_parent, dst_name)
    for name in os.listxattr(src, follow_symlinks=False):
        if not name.startswith(OVERLAY_XATTR_PREFIX):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)
    os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_parent,
             follow_symlinks=False)
