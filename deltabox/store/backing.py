"""The store's backing filesystem: an XFS with reflinks (and project quotas) under
`state_dir/store`, found or made at start-up and released at shutdown.

If the state dir is on XFS already the store is a plain directory there. Otherwise the
store lives in a sparse image file, `state_dir/store.xfs`, made once with mkfs.xfs and
loop-mounted (nosuid, nodev, prjquota when the kernel has XFS quotas: the per-branch disk
limits of `deltabox.host.quota`). The loop device is attached with autoclear, so
unmounting the store is all it takes to leave nothing behind; `release_backing` waits
for that, and names whoever keeps the store busy.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from deltabox.host import linux
from deltabox.host.quota import kernel_has_xfs_quota, super_options
from deltabox.units import parse_size

__all__ = ["Backing", "ensure_backing", "release_backing"]

log = structlog.get_logger("deltabox.store.backing")


@dataclass(frozen=True)
class Backing:
    root: Path        # the store root (on XFS with reflink)
    kind: str         # "host-xfs" or "loop-image"
    image: Path | None


def _probe_reflink(directory: Path) -> None:
    """FICLONE a probe file; raise with a clear message if the fs cannot."""
    src = directory / ".reflink-probe-src"
    dst = directory / ".reflink-probe-dst"
    try:
        src.write_bytes(b"deltabox reflink probe\n" * 200)
        with open(src, "rb") as s, open(dst, "wb") as d:
            linux.ficlone(s.fileno(), d.fileno())
        if dst.read_bytes() != src.read_bytes():
            raise OSError("reflinked copy differs from its source")
    except OSError as e:
        raise RuntimeError(f"{directory} does not support reflinks (FICLONE: {e}); DeltaBox "
                           "needs XFS created with -m reflink=1 (or let it create its own "
                           "loop-backed image by using a state dir on a non-XFS filesystem)") from e
    finally:
        for p in (src, dst):
            p.unlink(missing_ok=True)


def ensure_backing(state_dir: Path, image_size: str = "64G") -> Backing:
    """Make `state_dir/store` an XFS-with-reflink directory and return it.

    If `state_dir` is on XFS already, the store is a plain directory there.
    Otherwise a sparse image file `state_dir/store.xfs` is created (once) with
    `mkfs.xfs -m reflink=1 -n ftype=1` and loop-mounted on `state_dir/store`;
    a mount left by a crashed daemon is reused.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    # Host users must not reach layers or branches (setuid files, private data).
    os.chmod(state_dir, 0o700)
    root = state_dir / "store"
    root.mkdir(exist_ok=True)
    if linux.is_mountpoint(root):
        kind, image = "loop-image", state_dir / "store.xfs"
        # Left by a crashed daemon, possibly an older one: enforce today's flags.
        linux.mount("none", root, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID
                     | linux.MS_NODEV | linux.MS_NOATIME)
        if not super_options(root) & {"prjquota", "pquota"} and kernel_has_xfs_quota():
            # A remount cannot turn quotas on, and adopted sandboxes keep the store
            # busy: disk limits wait for the next clean start (a fresh mount).
            log.warning("store.quota_off_until_clean_restart", store=str(root))
    elif linux.filesystem_type(state_dir) == linux.XFS_SUPER_MAGIC:
        kind, image = "host-xfs", None
    else:
        kind, image = "loop-image", state_dir / "store.xfs"
        if not image.exists():
            tmp = state_dir / "store.xfs.new"
            with open(tmp, "wb") as f:
                f.truncate(parse_size(image_size))
            subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-n", "ftype=1",
                            str(tmp)], check=True, capture_output=True)
            tmp.rename(image)
            log.info("store.image_created", image=str(image), size=image_size)
        # "loop" makes mount(8) attach a loop device with autoclear: unmounting
        # the store releases the device, so nothing is left behind. prjquota:
        # per-branch disk limits (deltabox.host.quota); quotas can only be turned on
        # at mount time, so an older image gets them here, at its next start.
        options = "loop,noatime,nosuid,nodev"
        if kernel_has_xfs_quota() is not False:
            options += ",prjquota"
        res = subprocess.run(["mount", "-t", "xfs", "-o", options, str(image), str(root)],
                             capture_output=True, text=True)
        if res.returncode != 0 and options.endswith(",prjquota"):
            # XFS was not loaded yet, so support could not be told beforehand.
            log.warning("store.mount_without_quota", error=res.stderr.strip())
            res = subprocess.run(["mount", "-t", "xfs", "-o", "loop,noatime,nosuid,nodev",
                                  str(image), str(root)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"mounting the store image {image} failed: {res.stderr.strip()}")
        # Private, so overlay mounts under it do not propagate into other namespaces.
        linux.mount("none", root, None, linux.MS_PRIVATE)
    os.chmod(root, 0o700)
    _probe_reflink(root)
    return Backing(root=root, kind=kind, image=image)


def release_backing(backing: Backing, wait: float = 3.0, busy_wait: float = 5.0) -> None:
    """Unmount the loop-backed store; its loop device (autoclear) then detaches,
    which the kernel does asynchronously: wait for it, so that "stopped" means
    nothing is left.

    The store is never left mounted: busy (EBUSY: a process still has a file, cwd or
    mount in it) for longer than `busy_wait`, it is detached lazily, naming the
    processes that hold it; the loop device then detaches when the last of them
    lets go."""
    if backing.kind != "loop-image" or not linux.is_mountpoint(backing.root):
        return
    deadline = time.monotonic() + busy_wait
    while True:
        try:
            linux.umount(backing.root)
            break
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            if time.monotonic() > deadline:
                log.error("store.busy_detached_lazily", store=str(backing.root),
                          mounts=linux.mounts_under(backing.root)[:10],
                          holders=_store_users(backing.root)[:10])
                linux.umount(backing.root, linux.MNT_DETACH)
                break
            time.sleep(0.05)
    deadline = time.monotonic() + wait
    while _loop_devices_for(backing.image) and time.monotonic() < deadline:
        time.sleep(0.01)
    if _loop_devices_for(backing.image):
        log.error("store.loop_device_still_attached", image=str(backing.image),
                  devices=_loop_devices_for(backing.image),
                  holders=_store_users(backing.root)[:10])


def _store_users(root: Path) -> list[str]:
    """'pid (comm)' of the processes with a cwd, root or open file below `root`."""
    prefix = str(root)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [os.readlink(proc / "cwd"), os.readlink(proc / "root")]
            links += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            if any(t == prefix or t.startswith(prefix + "/") for t in links):
                found.append(f"{proc.name} ({(proc / 'comm').read_text().strip()})")
        except OSError:
            pass
    return found


def _loop_devices_for(image: Path | None) -> list[str]:
    found = []
    for backing_file in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing_file.read_text().strip() == str(image):
                found.append(backing_file.parent.parent.name)
        except OSError:
            pass
    return found

