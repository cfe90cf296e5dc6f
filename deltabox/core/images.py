"""Image import: rootfs tarballs, directories, `docker save` archives, OCI layouts.

Each source becomes one or more finished layer directories in the store's tmp area, which
`Store.commit_image` then renames into place in one transaction. OCI/Docker whiteouts
(`.wh.NAME`, `.wh..wh..opq`) become overlayfs whiteouts (0:0 character devices, the opaque
xattr) as the entries are written.

An image is hostile input. Whatever it contains, an import either fails with
`InvalidArgument`, leaving no layer and nothing in store/tmp, or writes only below the layer
directory it is building:

- Every entry is written by `LayerWriter` (`deltabox.core.image_layers`), relative to an fd
  of that layer's root: its parent directory is opened with openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS) (missing ones are made one component at a time with O_NOFOLLOW), the
  entry itself with *at() calls on one name that never follow a symlink. A symlink the image
  itself made is never followed either: an entry below one (`a -> /etc`, then `a/passwd`) is
  refused.
- Refused: absolute names and `..` components (entry names, hardlink targets, names and
  symlinks inside docker/OCI archives, OCI digests), hardlinks to directories, to what is
  missing or through symlinks, a layer root that is not a directory, whiteouts naming `.`,
  `..`, nothing or another whiteout, or that are not plain files, paths deeper than
  MAX_PATH_DEPTH (`deltabox.core.image_layers`), sparse files and entry types other than
  files, directories, symlinks, hardlinks, FIFOs and devices, symlink loops in archives, OCI
  index cycles or nesting deeper than MAX_INDEX_DEPTH, archive members and blobs that are
  not regular files (a FIFO would block the import), metadata JSON over MAX_JSON_BYTES, and
  any image of more than `max_image_bytes` of file data or `max_image_entries` entries
  (inodes) in all its layers together (the daemon's --max-image-bytes /
  --max-image-entries).
- Tar headers are parsed by `tarfile` with `_SafeTarInfo` (`deltabox.core.image_formats`):
  extended headers (pax, GNU long names) are bounded in size and in number per member and
  parsed in linear time (Python 3.11's own pax parser backtracks quadratically), and a
  corrupt header after the first one is an error, not a silent end of the archive.
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
- Only sources below the daemon's image directories (--image-dir) are read at all
  (`resolve_import_source`): the daemon is root, and an image is readable in a sandbox.

`tarfile.extractall(filter="data")` is not used: it resolves names with os.path.realpath
(following symlinks through the host's namespace, racy), refuses devices outright, and
knows nothing of whiteouts or limits.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable, Iterable

import structlog

from deltabox.host import linux
from deltabox.core.fdwalk import proc_fd_path, remove_tree_contents, walk_tree
from deltabox.core.image_formats import (compression, docker_layers, oci_layers, open_archive,
                                         reopen_regular, top_level_names, unpack_layer)
from deltabox.core.image_layers import (Entry, ImportBudget, ImportLimits, LayerWriter, Progress,
                                        report_warnings, shown)
from deltabox.errors import ImageNotFound, InvalidArgument, PermissionDenied
from deltabox.store.layout import remove_tree
from deltabox.store.metadata import Store
from deltabox.store.records import ImageRecord, validate_name

__all__ = ["import_image", "detect_format", "resolve_import_source"]

log = structlog.get_logger("deltabox.core.images")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# ---- entry points ---------------------------------------------------------------------------

def resolve_import_source(source: str, image_dirs: Iterable[Path]) -> Path:
    """The source, resolved, if it lies below one of the daemon's image dirs.
    The daemon runs as root: without this any client could import (and then
    read in a sandbox) /etc/shadow or /root."""
    if not source:
        raise InvalidArgument("source is required: an absolute path below one of the "
                              "daemon's image directories")
    if "\0" in source:
        raise InvalidArgument(f"source must not contain NUL bytes: {source!r}")
    path = Path(source)
    if not path.is_absolute():
        raise InvalidArgument(f"source must be an absolute path on the daemon's host, "
                              f"not {source!r}")
    try:
        real = path.resolve(strict=True)
    except OSError:
        raise ImageNotFound(f"image source {source} does not exist") from None
    dirs = tuple(image_dirs)
    if not any(real.is_relative_to(d.resolve()) for d in dirs):
        raise PermissionDenied(
            f"image source {source} is outside the daemon's image directories "
            f"({', '.join(map(str, dirs))}): copy it there, or start the daemon with "
            "--image-dir")
    return real


def detect_format(source: Path) -> str:
    """'dir', 'oci', 'docker-archive' or 'tar'."""
    if source.is_dir():
        if os.path.lexists(source / "oci-layout") and os.path.lexists(source / "index.json"):
            return "oci"
        return "dir"
    if not source.is_file():
        raise ImageNotFound(f"image source {source} does not exist")
    if compression(source) is None:
        names = top_level_names(source, {"manifest.json", "oci-layout", "index.json"})
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
    budget = ImportBudget(limits or ImportLimits())
    layer_dirs: list[Path] = []
    try:
        if fmt == "dir":
            _import_directory(store, source, budget, progress, layer_dirs)
        elif fmt == "tar":
            total = source.stat().st_size
            with open(source, "rb") as f:
                unpack_layer(store, f, total, "rootfs", budget, progress, layer_dirs)
        else:
            with open_archive(source) as archive:
                layers = (docker_layers(archive) if fmt == "docker-archive"
                          else oci_layers(archive))
                for i, rel in enumerate(layers):
                    f, size = archive.open_member(rel)
                    with f:
                        unpack_layer(store, f, size, f"layer {i + 1}", budget, progress,
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
    remove_tree(layer)


# ---- host directories -----------------------------------------------------------------------

def _import_directory(store: Store, source: Path, budget: ImportBudget, progress: Progress,
                      layer_dirs: list[Path]) -> None:
    dst = store.new_tmp_dir()
    layer_dirs.append(dst)
    phase = "directory"
    progress("copying directory", 0, 0)
    src_fd = os.open(source, _DIR_FLAGS)
    try:
        root_st = os.fstat(src_fd)
        links: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path: hardlinks
        with LayerWriter(dst, phase, budget) as writer:
            writer.add(_entry_of_stat(".", root_st, _read_xattrs(proc_fd_path(src_fd, "."))))
            for rel, st, dir_fd, name in walk_tree(src_fd):
                where = f"{phase}: {shown(rel)}"
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
                        writer.add(Entry(rel, "hardlink", linkname=first))
                        continue
                if e.kind == "file":
                    budget.data(where, st.st_size)
                    writer.add(e, _copy_host_file(dir_fd, name, st, where))
                else:
                    writer.add(e)
        report_warnings(writer, progress)
    finally:
        os.close(src_fd)


def _entry_of_stat(rel: str, st: os.stat_result, xattrs: dict[str, bytes],
                   linkname: str = "") -> Entry:
    fmt = stat.S_IFMT(st.st_mode)
    kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev",
            stat.S_IFSOCK: "socket"}[fmt]
    return Entry(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
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
        src = reopen_regular(os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
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
