"""The store's directories on disk, and the fd-relative helpers that walk them.

Layout under the store root (an XFS filesystem with reflink, see `deltabox.store.backing`)::

    meta.db                   metadata (deltabox.store.metadata)
    layers/<layer-id>/        immutable layers
    branches/<branch-id>/{upper,work}   an XFS project each: the sandbox's disk limit
    mnt/<branch-id>/          where a branch's overlay is mounted
    images/<checkpoint-id>/   CRIU images of full checkpoints
    tmp/                      work in progress (new-XXXX), wiped at start-up

`Layout` makes and removes these directories; it knows no records (the database is
`Store`, which builds on it). New directories are made under tmp/ and renamed into place
by the caller's transaction. What lies below a layer, branch or tmp dir is a sandbox's:
it is walked and removed fd-relative, never following a symlink (`remove_tree`,
`tree_size`; the primitives are `deltabox.core.fdwalk`'s).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from deltabox.host import linux
from deltabox.core.fdwalk import remove_tree_contents, walk_tree
from deltabox.host.quota import DiskLimit, ProjectQuotas
from deltabox.store.records import Mount

__all__ = ["Layout", "remove_tree", "tree_size", "syncfs"]


class Layout:
    """The directories of a store root, its branches' XFS projects (disk limits), and
    branch overlay mounts described as data."""

    def __init__(self, root: Path):
        self.root = root
        self.layers_dir = root / "layers"
        self.branches_dir = root / "branches"
        self.mnt_dir = root / "mnt"
        self.tmp_dir = root / "tmp"
        self.images_dir = root / "images"  # CRIU images of full checkpoints
        for d in (self.layers_dir, self.branches_dir, self.mnt_dir, self.tmp_dir,
                  self.images_dir):
            d.mkdir(exist_ok=True)
        # Per-branch disk limits: the project ids in use are those of the dirs.
        self.quotas = ProjectQuotas(root)
        self.quotas.scan([*self.branches_dir.iterdir(), *self.tmp_dir.iterdir()])

    # ---- new directories -------------------------------------------------------------

    def new_tmp_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="new-", dir=self.tmp_dir))

    def layer_path(self, layer_id: str) -> Path:
        return self.layers_dir / layer_id

    def images_path(self, checkpoint_id: str) -> Path:
        return self.images_dir / checkpoint_id

    def branch_mount_for(self, branch_id: str, layers: tuple[str, ...]) -> Mount:
        """The overlay mount of branch dirs `branch_id` over `layers` (bottom first)."""
        bdir = self.branches_dir / branch_id
        # index=off/xino=off: layers are shared by many branches and never
        # exported, so overlay's inode index would only cost mount time.
        # redirect_dir/metacopy off: layers hold plain files only (see deltafs).
        return Mount(str(self.mnt_dir / branch_id),
                     tuple(str(self.layer_path(lid)) for lid in layers),
                     str(bdir / "upper"), str(bdir / "work"),
                     ("index=off", "xino=off", "redirect_dir=off", "metacopy=off"))


    def _init_upper(self, upper: Path, lower: tuple[str, ...]) -> None:
        """A fresh upper dir whose root looks like the chain's top root: the merged
        root takes its owner, mode and times from the upper (chmod / survives)."""
        upper.mkdir()
        if lower:
            src = self.layer_path(lower[-1])
            top = os.lstat(src)
            os.chown(upper, top.st_uid, top.st_gid)
            os.chmod(upper, stat.S_IMODE(top.st_mode))
            for name in os.listxattr(src):
                if not name.startswith("trusted.overlay."):
                    os.setxattr(upper, name, os.getxattr(src, name))
            os.utime(upper, ns=(top.st_atime_ns, top.st_mtime_ns))

    def _new_branch_tmp(self, lower: tuple[str, ...], spec: dict) -> Path:
        """tmp/new-XXXX/{upper,work}, in a project of their own limited as `spec` says
        (tagged first: upper and work inherit it, so overlayfs's renames from work
        into upper stay inside one project)."""
        tmp = self.new_tmp_dir()
        try:
            self.quotas.assign(tmp, DiskLimit.of(spec))
            self._init_upper(tmp / "upper", lower)
            (tmp / "work").mkdir()
        except BaseException:
            self._remove_branch_tree(tmp)
            raise
        return tmp

    def _remove_branch_tree(self, path: Path) -> None:
        """Delete a branch's (or a tmp) dir, then free its project id."""
        with self.quotas.removing(path):
            remove_tree(path)

    def new_branch_dirs(self, branch_id: str, lower: tuple[str, ...] = (),
                        spec: dict | None = None) -> Path:
        """Create branches/<id>/{upper,work} (no row yet: see `switch_branch`), with the
        disk limit of `spec` (the sandbox's: every branch of a sandbox gets it)."""
        tmp = self._new_branch_tmp(lower, spec or {})
        target = self.branches_dir / branch_id
        tmp.rename(target)
        return target

    def delete_branch_dirs(self, branch_id: str) -> None:
        self._remove_branch_tree(self.branches_dir / branch_id)
        target = self.mnt_dir / branch_id
        if target.exists() and not linux.is_mountpoint(target):
            target.rmdir()


def syncfs(path: Path) -> None:
    """Flush the store's filesystem (durable mode: layers survive power loss)."""
    import ctypes
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:  # a flush that failed is no flush
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs of the store failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def tree_size(path: Path) -> int:
    """Bytes allocated to the files of a layer (its contents are a sandbox's: walked
    fd-relative, following no symlink)."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return sum(st.st_blocks * 512 for _, st, _, _ in walk_tree(fd)
                   if not stat.S_ISDIR(st.st_mode))
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a tree, refusing to cross into mounts (a stale mount is a bug, not data).

    `path` is the daemon's (a layer, a branch, a tmp or images dir); what lies below it
    is a sandbox's, so it is removed fd-relative without following symlinks, and without
    recursion: shutil.rmtree recurses once per level, and a sandbox can nest directories
    deeper than Python's recursion limit (a RecursionError would then block the
    branch's deletion and every later start-up's reconciliation)."""
    if not path.exists() and not path.is_symlink():
        return
    if linux.mounts_under(path):
        raise RuntimeError(f"refusing to delete {path}: mounts below it "
                           f"{linux.mounts_under(path)}")
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent)
        try:
            remove_tree_contents(fd)
        finally:
            os.close(fd)
        os.rmdir(path.name, dir_fd=parent)
    finally:
        os.close(parent)
