"""Per-branch disk limits: XFS project quotas on each branch's directories.

Vocabulary
----------
project id
    An XFS inode attribute (``fsx_projid``). A directory with the PROJINHERIT
    flag hands its project id to every inode created below it, so tagging a
    branch's directory before its ``upper`` and ``work`` are made puts all the
    sandbox writes (overlayfs creates in ``work`` and renames into ``upper``) in
    one project. Layers are built in untagged ``tmp/`` dirs: project 0, unlimited.
limit
    Block and inode hard limits of a project id, set with quotactl(Q_XSETQLIM)
    on the store's filesystem. Enforced only if the filesystem is mounted with
    ``prjquota`` (and the kernel has CONFIG_XFS_QUOTA); a write over the limit
    fails with ENOSPC (XFS's answer for project quotas).

Lifecycle: `ProjectQuotas.assign` picks a free id, tags a fresh directory and
sets its limit (before anything is mounted on it); `ProjectQuotas.removing`
frees the id once the directory is gone. The ids in use are read back from the
directories at start-up (`scan`): the tag lives where it takes effect, so it
cannot disagree with a record. See docs/deltafs.md, "Disk limits".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import structlog

from deltabox.host import linux

__all__ = ["ProjectQuotas", "DiskLimit", "QuotaUsage", "get_project", "set_project",
           "kernel_has_xfs_quota", "super_options"]

log = structlog.get_logger("deltabox.quota")

# linux/fs.h: struct fsxattr and its ioctls.
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x200
_FSXATTR = struct.Struct("=IIIII8s")  # xflags, extsize, nextents, projid, cowextsize, pad

# linux/quota.h, linux/dqblk_xfs.h
_SYS_QUOTACTL_FD = 443  # the same number on every architecture (kernel >= 5.14)
PRJQUOTA = 2
Q_XGETQUOTA = 0x5803
Q_XSETQLIM = 0x5804
Q_XGETQSTAT = 0x5805
FS_DQUOT_VERSION = 1
FS_PROJ_QUOTA = 2
FS_DQ_ISOFT, FS_DQ_IHARD, FS_DQ_BSOFT, FS_DQ_BHARD = 1, 2, 4, 8
FS_QUOTA_PDQ_ACCT, FS_QUOTA_PDQ_ENFD = 0x10, 0x20
BASIC_BLOCK = 512  # quotactl's XFS interface counts blocks of 512 bytes

MAX_PROJECT_ID = (1 << 32) - 2  # -1 is "no id" to the kernel


class _FsDiskQuota(ctypes.Structure):
    _fields_ = [("d_version", ctypes.c_int8), ("d_flags", ctypes.c_int8),
                ("d_fieldmask", ctypes.c_uint16), ("d_id", ctypes.c_uint32),
                ("d_blk_hardlimit", ctypes.c_uint64), ("d_blk_softlimit", ctypes.c_uint64),
                ("d_ino_hardlimit", ctypes.c_uint64), ("d_ino_softlimit", ctypes.c_uint64),
                ("d_bcount", ctypes.c_uint64), ("d_icount", ctypes.c_uint64),
                ("d_itimer", ctypes.c_int32), ("d_btimer", ctypes.c_int32),
                ("d_iwarns", ctypes.c_uint16), ("d_bwarns", ctypes.c_uint16),
                ("d_itimer_hi", ctypes.c_int8), ("d_btimer_hi", ctypes.c_int8),
                ("d_rtbtimer_hi", ctypes.c_int8), ("d_padding2", ctypes.c_int8),
                ("d_rtb_hardlimit", ctypes.c_uint64), ("d_rtb_softlimit", ctypes.c_uint64),
                ("d_rtbcount", ctypes.c_uint64), ("d_rtbtimer", ctypes.c_int32),
                ("d_rtbwarns", ctypes.c_uint16), ("d_padding3", ctypes.c_int16),
                ("d_padding4", ctypes.c_char * 8)]


class _FsQFileStat(ctypes.Structure):
    _fields_ = [("qfs_ino", ctypes.c_uint64), ("qfs_nblks", ctypes.c_uint64),
                ("qfs_nextents", ctypes.c_uint32)]


class _FsQuotaStat(ctypes.Structure):
    _fields_ = [("qs_version", ctypes.c_int8), ("qs_flags", ctypes.c_uint16),
                ("qs_pad", ctypes.c_int8), ("qs_uquota", _FsQFileStat),
                ("qs_gquota", _FsQFileStat), ("qs_incoredqs", ctypes.c_uint32),
                ("qs_btimelimit", ctypes.c_int32), ("qs_itimelimit", ctypes.c_int32),
                ("qs_rtbtimelimit", ctypes.c_int32), ("qs_bwarnlimit", ctypes.c_uint16),
                ("qs_iwarnlimit", ctypes.c_uint16)]


assert ctypes.sizeof(_FsDiskQuota) == 112 and ctypes.sizeof(_FsQuotaStat) == 80

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


# ---- raw calls: each raises OSError naming the call ---------------------------------------

def get_project(fd: int) -> int:
    """The project id of the inode `fd` (FS_IOC_FSGETXATTR)."""
    buf = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    return _FSXATTR.unpack(buf)[3]


def set_project(fd: int, project: int) -> None:
    """Give the directory `fd` project id `project` and PROJINHERIT: what is
    created below it from now on inherits the id."""
    xflags, extsize, nextents, _, cowextsize, pad = _FSXATTR.unpack(
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size)))
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, _FSXATTR.pack(xflags | FS_XFLAG_PROJINHERIT, extsize,
                                                     nextents, project, cowextsize, pad))


def _quotactl(mount_fd: int, cmd: int, project: int, buf, what: str) -> None:
    ret = _libc.syscall(_SYS_QUOTACTL_FD, ctypes.c_uint(mount_fd),
                        ctypes.c_uint((cmd << 8) | PRJQUOTA), ctypes.c_uint(project),
                        ctypes.byref(buf))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"quotactl_fd({what}, project {project}): {os.strerror(err)}")


def quota_flags(mount_fd: int) -> int:
    """FS_QUOTA_* flags of the filesystem holding `mount_fd` (Q_XGETQSTAT)."""
    st = _FsQuotaStat()
    _quotactl(mount_fd, Q_XGETQSTAT, 0, st, "Q_XGETQSTAT")
    return st.qs_flags


def set_limit(mount_fd: int, project: int, block_bytes: int, inodes: int) -> None:
    """Hard limits of a project (0 = none); soft limits are cleared."""
    q = _FsDiskQuota(d_version=FS_DQUOT_VERSION, d_flags=FS_PROJ_QUOTA, d_id=project,
                     d_fieldmask=FS_DQ_ISOFT | FS_DQ_IHARD | FS_DQ_BSOFT | FS_DQ_BHARD,
                     d_blk_hardlimit=-(-block_bytes // BASIC_BLOCK), d_ino_hardlimit=inodes)
    _quotactl(mount_fd, Q_XSETQLIM, project, q, "Q_XSETQLIM")


@dataclass(frozen=True)
class QuotaUsage:
    bytes: int
    inodes: int
    limit_bytes: int
    limit_inodes: int


def get_usage(mount_fd: int, project: int) -> QuotaUsage:
    q = _FsDiskQuota()
    try:
        _quotactl(mount_fd, Q_XGETQUOTA, project, q, "Q_XGETQUOTA")
    except OSError as e:
        if e.errno == errno.ENOENT:  # no dquot: nothing charged, no limit
            return QuotaUsage(0, 0, 0, 0)
        raise
    return QuotaUsage(q.d_bcount * BASIC_BLOCK, q.d_icount,
                      q.d_blk_hardlimit * BASIC_BLOCK, q.d_ino_hardlimit)


def kernel_has_xfs_quota() -> bool | None:
    """Whether the kernel's XFS was built with quota support (CONFIG_XFS_QUOTA):
    it then has /proc/fs/xfs/xqmstat. None if XFS is not loaded yet (no answer)."""
    if not os.path.isdir("/proc/fs/xfs"):
        return None
    return os.path.exists("/proc/fs/xfs/xqmstat")


def super_options(target: str | os.PathLike) -> set[str]:
    """The superblock options of the mount at `target` (from /proc/self/mountinfo)."""
    want, found = str(Path(target)), set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if linux._unescape(left.split()[4]) == want:
                found = set(right.split()[2].split(","))  # the last mount on top wins
    return found


def _host_projects(path: str = "/etc/projid") -> list[int]:
    """Project ids the host's administrator named (xfs_quota's name:id file)."""
    try:
        with open(path) as f:
            return [int(line.split(":")[1]) for line in f
                    if line.count(":") == 1 and line.split(":")[1].strip().isdigit()]
    except OSError:
        return []


# ---- the allocator ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskLimit:
    bytes: int = 0   # 0 = none
    inodes: int = 0  # 0 = none

    @classmethod
    def of(cls, spec: dict) -> "DiskLimit":
        return cls(int(spec.get("disk_bytes", 0)), int(spec.get("disk_inodes", 0)))


class ProjectQuotas:
    """Project ids and limits of one store's branch directories.

    `tagging`: new branch dirs get a project id (always, where the filesystem
    allows it: a store mounted with prjquota later then enforces limits on them
    too). `enforced`: the kernel enforces limits now; `state` says why not."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._used: set[int] = set(_host_projects())
        self._low = 1  # every id below this is in use
        self.tagging, self.enforced, self.state = self._probe()
        if not self.enforced and not linux.is_mountpoint(root):
            # A host filesystem: without quotas we cannot see which ids its other
            # users hold, so we take none (a loop-backed store is ours alone).
            self.tagging = False

    def _probe(self) -> tuple[bool, bool, str]:
        if linux.filesystem_type(self.root) != linux.XFS_SUPER_MAGIC:
            return False, False, "unavailable: the store is not on XFS"
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                inherited = get_project(fd)
            except OSError as e:
                return False, False, f"unavailable: no project ids on this filesystem ({e})"
            if inherited:
                # Our tagged dirs could not be renamed into a dir of another project
                # (EXDEV): leave the host's project quota alone.
                return False, False, (f"unavailable: the store dir is in the host's XFS project "
                                      f"{inherited}")
            try:
                flags = quota_flags(fd)
            except OSError as e:
                # ENOSYS: no quota support in the kernel, or no quota on this mount.
                if e.errno != errno.ENOSYS:
                    return True, False, f"unavailable: {e}"
                if not kernel_has_xfs_quota():
                    return True, False, ("unavailable: this kernel's XFS has no quota support "
                                         "(CONFIG_XFS_QUOTA)")
                flags = 0
        finally:
            os.close(fd)
        if flags & FS_QUOTA_PDQ_ENFD:
            return True, True, "enforced"
        if flags & FS_QUOTA_PDQ_ACCT:
            return True, False, "unavailable: the store is mounted with pqnoenforce"
        return True, False, "unavailable: the store's filesystem is not mounted with prjquota"

    def scan(self, dirs: Iterable[Path]) -> None:
        """Note the project ids of existing directories (at start-up)."""
        for d in dirs:
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                project = get_project(fd)
            except OSError:
                continue
            finally:
                os.close(fd)
            if project:
                self._used.add(project)

    @contextlib.contextmanager
    def _mount_fd(self) -> Iterator[int]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def _allocate(self, mount_fd: int) -> int:
        """The smallest id neither ours nor charged with inodes (another store on a
        shared host XFS, or a directory of ours not deleted yet)."""
        with self._lock:
            project = self._low
            while True:
                while project in self._used:
                    project += 1
                if project > MAX_PROJECT_ID:
                    raise OSError(errno.ENOSPC, "no free XFS project id")
                if not self.enforced or get_usage(mount_fd, project).inodes == 0:
                    break
                project += 1
            self._used.add(project)
            if project == self._low:
                self._low += 1
            return project

    def _free(self, project: int) -> None:
        with self._lock:
            self._used.discard(project)
            self._low = min(self._low, project)

    def assign(self, directory: Path, limit: DiskLimit) -> int:
        """Give the new, empty `directory` a project of its own with `limit`; 0 if
        the store cannot tag. The limit is set before the id is handed over, so a
        stale limit of a reused id never applies."""
        if not self.tagging:
            return 0
        with self._mount_fd() as mount_fd:
            project = self._allocate(mount_fd)
            try:
                if self.enforced:
                    set_limit(mount_fd, project, limit.bytes, limit.inodes)
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC)
                try:
                    set_project(fd, project)
                finally:
                    os.close(fd)
            except BaseException:
                self._free(project)
                raise
        return project

    def apply(self, directory: Path, limit: DiskLimit) -> int:
        """(Re)set the limit of `directory`'s project (at start-up: the store may have
        been mounted without prjquota before); returns the id, 0 if it has none."""
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            project = get_project(fd) if self.tagging else 0
        finally:
            os.close(fd)
        if project and self.enforced:
            with self._mount_fd() as mount_fd:
                set_limit(mount_fd, project, limit.bytes, limit.inodes)
        return project

    @contextlib.contextmanager
    def removing(self, directory: Path) -> Iterator[None]:
        """Around the removal of a tagged directory: its id is freed (and its limit
        cleared) once the body succeeded, never while files still count."""
        project = 0
        if self.tagging:
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                             | os.O_CLOEXEC)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    project = get_project(fd)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        yield
        if project and project in self._used:
            if self.enforced:
                try:
                    with self._mount_fd() as mount_fd:
                        set_limit(mount_fd, project, 0, 0)
                except OSError as e:  # assign() sets the limit again before reuse
                    log.warning("quota.clear_failed", project=project, error=str(e))
            self._free(project)
