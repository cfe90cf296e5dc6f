"""The sandbox's tmpfs layout: one tmpfs (`/dev`) for CRIU to archive per full checkpoint.

`deltabox-init` makes `/dev/shm` a directory of `/dev`'s tmpfs and masks `/proc` directories
with read-only binds of one empty directory of it (`/dev/.deltabox/empty`), because CRIU runs a
`tar` per tmpfs superblock inside the frozen window (docs/deltacr.md, "Where a full
checkpoint's time goes"); our CRIU patch 0006 makes that a plain tar (no gzip exec), and
restores the gzipped tarballs of images dumped before it.  These tests hold the layout to that, and hold the masks to being
unwritable by the sandbox's root (which keeps CAP_DAC_OVERRIDE and CAP_FOWNER), before and
after a checkpoint's restore.
"""

from __future__ import annotations

import gzip
import os

MASK_DIRS = ("/proc/acpi", "/proc/asound", "/proc/scsi")
EMPTY = "/dev/.deltabox/empty"


def _masked_dirs_inside(sbx) -> list[str]:
    out = sbx.exec("for d in " + " ".join(MASK_DIRS) + "; do [ -d $d ] && echo $d; done").stdout
    return out.decode().split()


def _assert_unwritable(sbx, paths) -> None:
    for path in paths:
        for cmd in (f"touch {path}/x", f"mkdir {path}/y", f"chmod 777 {path}",
                    f"umount {path}", f"mount -o remount,rw {path}"):
            r = sbx.exec(cmd)
            assert r.exit_code != 0, f"root inside could `{cmd}`: {r}"
        assert sbx.exec(f"ls -A {path}").check().stdout == b"", path


def _superblock(sbx, path: str) -> str:
    """The st_dev of `path` inside the sandbox."""
    return sbx.exec(f"stat -c %d {path}").check().stdout.decode().strip()


def test_one_tmpfs_and_masks_are_read_only(tiny):
    masked = _masked_dirs_inside(tiny)
    _assert_unwritable(tiny, [EMPTY, *masked])
    dev = _superblock(tiny, "/dev")
    for path in ("/dev/shm", EMPTY, *masked):
        assert _superblock(tiny, path) == dev, f"{path} is not a part of /dev's tmpfs"
    # /dev/shm: writable by all, sticky, and noexec (as Docker's)
    assert tiny.exec("stat -c %a /dev/shm").check().stdout == b"1777\n"
    tiny.exec("cp /bin/busybox /dev/shm/bb && chmod 755 /dev/shm/bb").check()
    assert tiny.exec("/dev/shm/bb true").exit_code == 126


def test_full_checkpoint_archives_one_tmpfs_and_restores_it(daemon, tiny):
    tiny.exec("echo kept > /dev/shm/state").check()
    ckpt = tiny.checkpoint("dev-layout", full=True)
    images = daemon.state_dir / "store" / "images" / ckpt.id
    tarballs = sorted(p.name for p in images.glob("tmpfs-*.tar.gz.img"))
    assert len(tarballs) == 1, tarballs
    with open(images / tarballs[0], "rb") as f:
        head = f.read(512)
    assert head[257:262] == b"ustar", "the tmpfs image is not a plain tar (CRIU patch 0006)"
    tiny.exec("echo changed > /dev/shm/state && touch /dev/shm/new").check()
    tiny.rollback(ckpt)
    assert tiny.exec("cat /dev/shm/state; ls /dev/shm").check().stdout == b"kept\nstate\n"
    _assert_unwritable(tiny, [EMPTY, *_masked_dirs_inside(tiny)])


def test_gzipped_tmpfs_image_of_an_older_criu_restores(daemon, tiny):
    """Images dumped before patch 0006 hold a gzipped tarball: the restore still reads it."""
    tiny.exec("echo old > /dev/shm/state").check()
    ckpt = tiny.checkpoint("gzipped-dev", full=True, rollback_likely=False)
    images = daemon.state_dir / "store" / "images" / ckpt.id
    (tarball,) = images.glob("tmpfs-*.tar.gz.img")
    data = tarball.read_bytes()
    assert data[:2] != b"\x1f\x8b"
    tmp = tarball.with_name(tarball.name + ".tmp")
    tmp.write_bytes(gzip.compress(data))
    os.replace(tmp, tarball)
    tiny.exec("echo new > /dev/shm/state").check()
    assert tiny.rollback(ckpt).path == "restore"  # CRIU reads the tarball (no double was built)
    assert tiny.exec("cat /dev/shm/state").check().stdout == b"old\n"
