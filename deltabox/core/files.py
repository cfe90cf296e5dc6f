"""File operations inside a sandbox's root, confined against `..` and symlinks.

Every path is resolved by the kernel with openat2(RESOLVE_IN_ROOT): `..`
stops at the sandbox root, absolute symlinks are taken relative to it, and a
symlink swapped in mid-walk cannot redirect the lookup outside. Final
components are then handled with *at() calls on the parent's fd, which never
resolve further. The daemon works on the host view of the sandbox's branch
(its overlay mount), so a file written here is what the sandbox sees.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from deltabox.host import linux
from deltabox.core.fdwalk import remove_tree_contents
from deltabox.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                             ResourceExhausted, error_from_errno)

__all__ = ["SandboxFiles", "FileInfo"]

MAX_PATH = 4096


@dataclass(frozen=True)
class FileInfo:
    path: str
    name: str
    type: str  # regular | directory | symlink | other
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    link_target: str = ""


def _split(path: str) -> tuple[str, str]:
    """('/a/b', 'c') for '/a/b/c'; validates the path."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument("path must be a non-empty string")
    if "\0" in path or len(path) > MAX_PATH:
        raise InvalidArgument(f"invalid path {path[:80]!r}")
    p = PurePosixPath("/") / path
    return str(p.parent), p.name


def _check_mode(mode: int) -> None:
    if not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"mode must be between 0 and 0o7777, not {mode:#o}")


def _os_error(e: OSError, path: str) -> Exception:
    """errors.error_from_errno, with the hints a file call can add; the OSError itself
    (INTERNAL) for an errno without a mapping."""
    text = f"{path}: {os.strerror(e.errno) if e.errno else e}"
    if e.errno == errno.ENXIO:  # open(2) of a FIFO without a reader, or of a socket
        text = f"{path}: not a regular file"
    elif e.errno == errno.ENOTEMPTY:
        text += " (use recursive)"
    return error_from_errno(e.errno or 0, text) or e


def _lstat_at(dir_fd: int, name: str) -> tuple[os.stat_result, str]:
    """lstat of one entry and, for a symlink, its target, both read through one O_PATH
    fd of the inode: consistent even if the sandbox swaps the name meanwhile."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        return st, (os.readlink("", dir_fd=fd) if stat.S_ISLNK(st.st_mode) else "")
    finally:
        os.close(fd)


def _info(path: str, name: str, st: os.stat_result, link_target: str = "") -> FileInfo:
    if stat.S_ISREG(st.st_mode):
        kind = "regular"
    elif stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "other"
    return FileInfo(path, name, kind, st.st_size, stat.S_IMODE(st.st_mode), st.st_uid,
                    st.st_gid, st.st_mtime, link_target)


# The largest file offset (loff_t is signed 64-bit).
MAX_OFFSET = (1 << 63) - 1
# The most entries ListDir answers with: a directory the sandbox filled with millions
# cost the daemon gigabytes of FileInfo before the reply failed at gRPC's size limit.
MAX_LIST_ENTRIES = 100_000


class SandboxFiles:
    """File API over one sandbox root directory (on the host)."""

    def __init__(self, root: Path, max_read: int):
        self.root = root
        self.max_read = max_read

    @contextmanager
    def _fd(self, path: str, flags: int, mode: int = 0) -> Iterator[int]:
        try:
            root = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:  # the host path of the branch stays out of the message
            raise FailedPrecondition(f"the sandbox's files are not reachable: "
                                     f"{os.strerror(e.errno)}") from None
        # Still its branch's mount? A destroy or rollback may have unmounted it since the
        # call began: the empty directory left on the host is not the sandbox's tree (a
        # write there would be lost, and would keep the directory from being removed).
        # Once open, the fd stays on the mount, whatever happens to the path.
        if not linux.is_mount_root_fd(root):
            os.close(root)
            raise FailedPrecondition("the sandbox's files are not mounted any more (it was "
                                     "destroyed or rolled back during the call)")
        try:
            fd = linux.openat2(root, path, flags, mode)
        except OSError as e:
            raise _os_error(e, path) from None
        finally:
            os.close(root)
        try:
            yield fd
        finally:
            os.close(fd)

    def _parent(self, path: str):
        parent, name = _split(path)
        if name in ("", ".", ".."):
            raise InvalidArgument(f"{path!r} does not name an entry")
        return self._fd(parent, os.O_PATH | os.O_DIRECTORY), name

    def read(self, path: str, offset: int = 0, length: int = 0) -> tuple[bytes, int]:
        _split(path)
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must be >= 0")
        if offset + length > MAX_OFFSET:
            raise InvalidArgument(f"offset + length must be at most {MAX_OFFSET} (2^63 - 1)")
        # O_NONBLOCK: opening a FIFO the sandbox made must not block a daemon thread.
        with self._fd(path, os.O_RDONLY | os.O_NONBLOCK) as fd:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"{path}: is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{path}: not a regular file")
            want = length or max(st.st_size - offset, 0)
            if want > self.max_read:
                raise ResourceExhausted(f"{path}: reading {want} bytes exceeds the limit of "
                                        f"{self.max_read}; read it in ranges")
            chunks, got = [], 0
            while got < want:
                try:
                    data = os.pread(fd, min(want - got, 1 << 20), offset + got)
                except OSError as e:
                    raise _os_error(e, path) from None
                if not data:
                    break
                chunks.append(data)
                got += len(data)
            return b"".join(chunks), st.st_size

    def write(self, path: str, data: bytes, mode: int = 0o644, append: bool = False,
              make_parents: bool = False) -> int:
        _split(path)
        _check_mode(mode)
        if make_parents:
            self.mkdir(str(PurePosixPath("/") / path) + "/..", parents=True, exist_ok=True)
        mode = mode or 0o644
        if append:
            with self._fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK,
                          mode) as fd:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise InvalidArgument(f"{path}: not a regular file")
                os.write(fd, data) if data else None
                return os.fstat(fd).st_size
        parent_cm, name = self._parent(path)
        with parent_cm as parent:
            # Write a temp file and rename it over the name: a reader never sees a
            # half-written file, and rename replaces a final symlink instead of
            # following it.
            tmp = f".deltabox-write-{secrets.token_hex(6)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode,
                             dir_fd=parent)
            except OSError as e:
                raise _os_error(e, path) from None
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)
                os.close(fd)
                fd = -1
                try:
                    existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    if stat.S_ISDIR(existing.st_mode):
                        raise InvalidArgument(f"{path}: is a directory")
                except FileNotFoundError:
                    pass
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except OSError as e:
                raise _os_error(e, path) from None
            finally:
                if fd >= 0:
                    os.close(fd)
                try:
                    os.unlink(tmp, dir_fd=parent)
                except FileNotFoundError:
                    pass
        return len(data)

    def list(self, path: str) -> list[FileInfo]:
        _split(path)
        with self._fd(path, os.O_RDONLY | os.O_DIRECTORY) as fd:
            out = []
            for entry in os.scandir(fd):
                if len(out) == MAX_LIST_ENTRIES:  # before gRPC would refuse the reply
                    raise ResourceExhausted(
                        f"{path}: more than {MAX_LIST_ENTRIES:,} entries; list it with an "
                        "exec (ls, find) in the sandbox")
                # One name below the directory's fd: nothing is followed. An entry the
                # sandbox removed meanwhile is skipped.
                try:
                    st, target = entry.stat(follow_symlinks=False), ""
                    if stat.S_ISLNK(st.st_mode):
                        st, target = _lstat_at(fd, entry.name)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise _os_error(e, str(PurePosixPath("/") / path / entry.name)) from None
                out.append(_info(str(PurePosixPath("/") / path / entry.name), entry.name, st,
                                 target))
            return sorted(out, key=lambda i: i.name)

    def stat(self, path: str) -> FileInfo:
        parent, name = _split(path)
        if name == "":
            with self._fd("/", os.O_PATH) as fd:
                return _info("/", "/", os.fstat(fd))
        parent_cm, name = self._parent(path)
        with parent_cm as pfd:
            try:
                st, target = _lstat_at(pfd, name)
            except OSError as e:
                raise _os_error(e, path) from None
        return _info(str(PurePosixPath("/") / path), name, st, target)

    def remove(self, path: str, recursive: bool = False) -> None:
        parent_cm, name = self._parent(path)
        with parent_cm as pfd:
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=pfd)
                    return
                if recursive:
                    dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, dir_fd=pfd)
                    try:
                        remove_tree_contents(dfd)
                    finally:
                        os.close(dfd)
                os.rmdir(name, dir_fd=pfd)
            except OSError as e:
                raise _os_error(e, path) from None

    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755,
              exist_ok: bool = False) -> None:
        _check_mode(mode)
        p = PurePosixPath("/") / _split(path)[0] / _split(path)[1]
        p = PurePosixPath(os.path.normpath(p))
        parts = p.parts[1:]
        if not parts:
            if exist_ok or parents:
                return
            raise AlreadyExists("/: exists")
        todo = [parts] if not parents else [parts[:i] for i in range(1, len(parts) + 1)]
        for comp in todo:
            parent = "/" + "/".join(comp[:-1])
            last = len(comp) == len(parts)
            with self._fd(parent, os.O_PATH | os.O_DIRECTORY) as pfd:
                try:
                    os.mkdir(comp[-1], mode or 0o755, dir_fd=pfd)
                except FileExistsError:
                    if last and not (exist_ok or parents):
                        raise AlreadyExists(f"{p}: exists") from None
                    # Follow a symlink only inside the sandbox root (openat2), never
                    # with a plain stat, which would resolve it against the host.
                    try:
                        with self._fd("/" + "/".join(comp), os.O_PATH) as efd:
                            is_dir = stat.S_ISDIR(os.fstat(efd).st_mode)
                    except NotFound:
                        is_dir = False
                    if not is_dir:
                        raise AlreadyExists(f"/{'/'.join(comp)}: exists and is not a "
                                            "directory") from None
                except OSError as e:
                    raise _os_error(e, str(p)) from None

