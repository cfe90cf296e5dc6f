"""Linux primitives: a checked Python layer over the raw cffi binding.

The binding (deltabox._native, built from native/src) returns -errno; this
module turns that into OSError naming the call, and adds the few helpers the
daemon needs that the stdlib lacks (mount, openat2, reflink probes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import signal
from pathlib import Path

from deltabox import _native

__all__ = [
    "mount", "mount_overlay", "umount", "openat2", "ficlone", "is_mountpoint", "is_mount_root_fd",
    "mounts_under",
    "filesystem_type", "HAS_OPENAT2", "RESOLVE_IN_ROOT", "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_BENEATH", "RESOLVE_NO_SYMLINKS", "MS_BIND", "MS_NOSUID", "MS_NODEV", "MS_NOATIME", "MS_REC", "MS_PRIVATE", "MS_RDONLY", "MS_REMOUNT",
    "MNT_DETACH", "load_device_filter", "attach_device_filter",
]

_lib = _native.lib
NATIVE_ABI_VERSION = 5
if _lib.NATIVE_ABI_VERSION != NATIVE_ABI_VERSION:  # stale build
    raise ImportError(f"deltabox._native ABI {_lib.NATIVE_ABI_VERSION} != {NATIVE_ABI_VERSION}; "
                      "rebuild with `python native/build.py`")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

FICLONE = 0x40049409
XFS_SUPER_MAGIC = 0x58465342


def _check(ret: int, what: str, path: str | os.PathLike | None = None) -> int:
    if ret < 0:
        err = -ret
        raise OSError(err, f"{what}: {os.strerror(err)}", None if path is None else str(path))
    return ret


def mount(source: str, target: str | os.PathLike, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    ffi = _native.ffi
    _check(_lib.dbx_mount(source.encode(), os.fsencode(target),
                          fstype.encode() if fstype else ffi.NULL, flags,
                          data.encode() if data else ffi.NULL), f"mount {fstype or ''}", target)


def mount_overlay(target: str | os.PathLike, lowers: list[str], upper: str | None = None,
                  work: str | None = None, options: tuple[str, ...] = (),
                  readonly: bool = False) -> None:
    """Mount overlayfs; `lowers` bottom first. One fsconfig("lowerdir+") per layer,
    so there is no limit on the length of the chain's paths (up to 500 layers).

    Layers are handed over as /proc/self/fd/N of O_PATH fds: overlayfs shows
    the strings it was given in mountinfo, and the sandbox (whose root this is)
    has no business learning the store's host paths."""
    ffi = _native.ffi
    fds: list[int] = []

    def by_fd(path: str) -> bytes:
        fds.append(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        return f"/proc/self/fd/{fds[-1]}".encode()
    try:
        keep = [ffi.new("char[]", by_fd(p)) for p in reversed(lowers)]
        opts = [ffi.new("char[]", o.encode()) for o in options]
        _check(_lib.dbx_mount_overlay(
            os.fsencode(target), ffi.new("char *[]", keep), len(keep),
            by_fd(upper) if upper else ffi.NULL, by_fd(work) if work else ffi.NULL,
            ffi.new("char *[]", opts), len(opts), int(readonly)), "mount overlay", target)
    finally:
        for fd in fds:
            os.close(fd)


def clone_entry(upper_fd: int, layer_fd: int, rel: str, st: os.stat_result) -> None:
    """Recreate upper/rel (not a directory) as layer/rel with its metadata;
    regular files are reflinked. See native/src/dbx_native.c."""
    _check(_lib.dbx_clone_entry(upper_fd, layer_fd, os.fsencode(rel), st.st_mode, st.st_rdev,
                                st.st_size, st.st_uid, st.st_gid, st.st_atime_ns,
                                st.st_mtime_ns), "clone entry", rel)


def copy_meta(upper_fd: int, layer_fd: int, rel: str, st: os.stat_result,
              keep_opaque: bool) -> None:
    """Owner, mode, xattrs (overlay's own only the opaque mark, if asked) and times."""
    _check(_lib.dbx_copy_meta(upper_fd, layer_fd, os.fsencode(rel), st.st_mode, st.st_uid,
                              st.st_gid, st.st_atime_ns, st.st_mtime_ns, int(keep_opaque)),
           "copy metadata", rel)


# BPF_DEVCG_ACC_* (linux/bpf.h), by devices.allow letter.
_DEVICE_ACCESS = {"m": 1, "r": 2, "w": 4}


def load_device_filter(rules: list[tuple[str, int | None, int | None, str]]) -> int:
    """A BPF_PROG_TYPE_CGROUP_DEVICE program (its fd, close it) allowing only
    `rules`: (type "c", "b" or "a", major, minor (None: any), access letters from
    "rwm"); any other open or mknod gets EPERM. See native/src/dbx_native.c."""
    ffi = _native.ffi
    table = ffi.new("struct dbx_dev_rule[]", len(rules))
    for row, (kind, major, minor, access) in zip(table, rules):
        row.type = kind.encode()
        row.major = -1 if major is None else major
        row.minor = -1 if minor is None else minor
        row.access = sum(_DEVICE_ACCESS[a] for a in set(access))
    log = ffi.new("char[]", 4096)
    ret = _lib.dbx_load_device_filter(table, len(rules), log, len(log))
    reason = ffi.string(log).decode(errors="replace").strip()
    return _check(ret, "bpf(BPF_PROG_LOAD) device filter" + (f" ({reason[-500:]})" if reason
                                                             else ""))


def attach_device_filter(cgroup_fd: int,
                         rules: list[tuple[str, int | None, int | None, str]]) -> None:
    """Let the tasks of the cgroup v2 directory `cgroup_fd` use only the devices
    `rules` allow (see load_device_filter); replaces the cgroup's previous filter."""
    prog_fd = load_device_filter(rules)
    try:
        _check(_lib.dbx_attach_device_filter(cgroup_fd, prog_fd),
               "bpf(BPF_PROG_ATTACH) device filter")
    finally:
        os.close(prog_fd)  # the attachment holds the program


def umount(target: str | os.PathLike, flags: int = 0) -> None:
    _check(_lib.dbx_umount2(os.fsencode(target), flags), "umount2", target)


def openat2(dirfd: int, path: str, flags: int, mode: int = 0,
            resolve: int = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) -> int:
    """openat2(2); by default `path` is resolved as if `dirfd` were "/"."""
    return _check(_lib.dbx_openat2(dirfd, os.fsencode(path), flags | os.O_CLOEXEC, mode, resolve),
                  "openat2", path)


def _probe_openat2() -> bool:
    try:
        os.close(openat2(-100, "/", os.O_PATH))
        return True
    except OSError as e:
        return e.errno != errno.ENOSYS


HAS_OPENAT2 = _probe_openat2()


def ficlone(src_fd: int, dst_fd: int) -> None:
    """Make dst share src's data blocks (XFS/btrfs reflink)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("f_blocks", ctypes.c_ulong), ("f_bfree", ctypes.c_ulong),
                ("f_bavail", ctypes.c_ulong), ("f_files", ctypes.c_ulong),
                ("f_ffree", ctypes.c_ulong), ("f_fsid", ctypes.c_int * 2),
                ("f_namelen", ctypes.c_long), ("f_frsize", ctypes.c_long),
                ("f_flags", ctypes.c_long), ("f_spare", ctypes.c_long * 4)]


_libc = ctypes.CDLL(None, use_errno=True)


def filesystem_type(path: str | os.PathLike) -> int:
    """statfs(2).f_type of the filesystem holding `path`."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buf.f_type


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _mangle(path: str) -> str:
    """A path as /proc/self/mountinfo writes it (the kernel's mangle(): space, tab,
    newline and backslash as octal escapes)."""
    for ch, esc in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        path = path.replace(ch, esc)
    return path


def mount_table(under: str = "") -> list[tuple[str, str, str]]:
    """(source, target, fstype) for each mount of this mount namespace; with `under`, only
    those whose line names that path (a prefilter: callers still compare the targets).
    A daemon with hundreds of sandboxes has thousands of mounts, and parsing every line
    took 2 ms a call under load, where most callers ask about one branch's directory:
    the lines are searched for the path in C first, and only those are parsed."""
    with open("/proc/self/mountinfo") as f:
        text = f.read()
    if under:
        needle = " " + _mangle(under)
        if needle not in text:
            return []
        lines = re.findall(r"^.*" + re.escape(needle) + r".*$", text, re.MULTILINE)
    else:
        lines = text.splitlines()
    out = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, source = right.split()[:2]
        out.append((_unescape(source), _unescape(fields[4]), fstype))
    return out


class _Statx(ctypes.Structure):  # struct statx, up to stx_attributes_mask (0x38)
    _fields_ = [("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32),
                ("stx_attributes", ctypes.c_uint64), ("_middle", ctypes.c_uint8 * 0x28),
                ("stx_attributes_mask", ctypes.c_uint64), ("_rest", ctypes.c_uint8 * 192)]


_AT_SYMLINK_NOFOLLOW, _AT_NO_AUTOMOUNT, _AT_EMPTY_PATH = 0x100, 0x800, 0x1000
_STATX_ATTR_MOUNT_ROOT = 0x2000


def is_mountpoint(path: str | os.PathLike) -> bool:
    """Is `path` (not followed if a symlink) the root of a mount? One statx(2)
    (STATX_ATTR_MOUNT_ROOT, Linux >= 5.8), not a read of the mount table; the table if
    statx cannot tell."""
    p = str(Path(path))
    buf = _Statx()
    if _libc.statx(-100, os.fsencode(p), _AT_SYMLINK_NOFOLLOW | _AT_NO_AUTOMOUNT, 0,
                   ctypes.byref(buf)) == 0:
        if buf.stx_attributes_mask & _STATX_ATTR_MOUNT_ROOT:
            return bool(buf.stx_attributes & _STATX_ATTR_MOUNT_ROOT)
    elif ctypes.get_errno() in (errno.ENOENT, errno.ENOTDIR):
        return False
    return any(target == p for _, target, _ in mount_table(under=p))


def is_mount_root_fd(fd: int) -> bool:
    """Is the directory open as `fd` the root of a mount? The same statx(2) on the fd
    itself: what a path named when it was opened, not what it names now. Without the
    attribute (Linux < 5.8): whether its device differs from its parent's."""
    buf = _Statx()
    if _libc.statx(fd, b"", _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, 0, ctypes.byref(buf)) == 0 \
            and buf.stx_attributes_mask & _STATX_ATTR_MOUNT_ROOT:
        return bool(buf.stx_attributes & _STATX_ATTR_MOUNT_ROOT)
    return os.fstat(fd).st_dev != os.stat("..", dir_fd=fd).st_dev


def mounts_under(path: str | os.PathLike) -> list[str]:
    """Mount targets at or below `path`, deepest first (the order to unmount in)."""
    p = str(Path(path))
    found = [t for _, t, _ in mount_table(under=p) if t == p or t.startswith(p + "/")]
    return sorted(set(found), key=lambda t: t.count("/"), reverse=True)


def children(pid: int) -> list[int]:
    """A process's children: every thread's (a subreaper's orphans go to any of its
    threads). [] once it has ended."""
    try:
        # Not Path.glob: it checks the directory exists, then lists it, and a process
        # that ended in between raised FileNotFoundError out of a destroy (seen in CI).
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # it ended
        return []
    found = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(k) for k in f.read().split()]
        except OSError:  # the thread ended
            continue
    return found


def zombie_children() -> list[int]:
    """This process's children that have exited and wait to be reaped."""
    found = []
    for pid in children(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == b"Z":
            found.append(pid)
    return found


def process_name_and_ns_depth(pid: int) -> tuple[str, int]:
    """A process's name (comm) and how deep its pid namespace is (1: the host's; a
    sandbox's init: 2). ('', 0) if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "", 0
    name, depth = "", 0
    for line in status.splitlines():
        if line.startswith("Name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("NSpid:"):
            depth = len(line.split()) - 1
    return name, depth


def kill_tree(pid: int, send) -> None:
    """SIGKILL a process and its descendants. `send(signal)` signals the process itself
    (through its Popen or a pidfd: its pid may have been reaped and reused); it is
    stopped first, so that it forks no more while they are listed. Gone already: done."""
    try:
        send(signal.SIGSTOP)
    except ProcessLookupError:
        return
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    for descendant in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(descendant, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGKILL)
