"""DeltaFS: sink a branch's upper directory into immutable layers; look up, diff, squash.

How a checkpoint works without patching overlayfs
-------------------------------------------------
A running sandbox's overlay cannot switch its upper directory, so the upper
keeps growing for the branch's whole life. A checkpoint therefore sinks only
what changed *since the previous checkpoint of the same branch*:

- `scan_upper` lists every entry of the upper with a change key
  (inode, ctime, mode); ctime moves on every write, chmod, chown, xattr change,
  link and rename, so an unchanged key means an unchanged entry.
- `sink_upper_into_layer` compares with the previous scan (the `Manifest`) and
  writes a new layer holding the changed entries -- regular files as reflinks
  (FICLONE: metadata only, no data copied), everything else recreated with the
  same metadata and xattrs -- plus their parent directories, and a whiteout
  for every entry that disappeared from the upper (it lives on in an earlier
  checkpoint layer and must be hidden there).

The checkpoint's chain is the branch's lower chain plus the layers of all its
checkpoints so far; stacked by overlayfs it shows exactly the upper's view.
Cost grows with the number of changed entries (plus a stat per upper entry),
not with the image or the data size.

Overlay-format layers: a whiteout is a 0:0 character device, an opaque
directory carries trusted.overlay.opaque=y. Other trusted.overlay.* xattrs
(origin, impure, ...) describe the live mount's lower layers and are dropped.
Branches mount with redirect_dir=off, so renaming a directory that came from a
lower layer fails with EXDEV and tools fall back to copying -- as with
Docker's overlay2 -- and no layer ever holds a redirect.
"""

from __future__ import annotations

import errno
import filecmp
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from deltabox import _linux

__all__ = ["Manifest", "SinkStats", "scan_upper", "sink_upper_into_layer", "lookup",
           "diff_chains", "manifest_from_layers", "squash_chain", "is_whiteout"]

OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"

# (inode, ctime_ns, st_mode): what `scan_upper` records per entry.
EntryKey = tuple[int, int, int]


@dataclass
class Manifest:
    """The upper directory as it was at the branch's last checkpoint.

    `entries` maps a relative path ("" is the root, "a/b" a child) to its key;
    a key of None means "unknown" (after a daemon restart), which makes the
    next sink treat the entry as changed -- always correct, only slower.
    """
    entries: dict[str, EntryKey | None] = field(default_factory=dict)


@dataclass
class SinkStats:
    changed: int = 0
    whiteouts: int = 0
    cloned_bytes: int = 0
    phases_ms: dict = field(default_factory=dict)  # filled in by the caller
    image_bytes: int = 0  # process images (full checkpoints), filled in by the caller


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _key(st: os.stat_result) -> EntryKey:
    return (st.st_ino, st.st_ctime_ns, st.st_mode)


def scan_upper(upper: Path) -> dict[str, tuple[EntryKey, os.stat_result]]:
    """Every entry of `upper` (relative path -> (key, lstat)), parents before children.

    Walks with directory fds (one open per level), so paths longer than
    PATH_MAX are fine."""
    out: dict[str, tuple[EntryKey, os.stat_result]] = {}
    root_st = os.lstat(upper)
    out[""] = (_key(root_st), root_st)
    root_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[str, int, list[str]]] = []

    def enter(rel: str, fd: int) -> None:
        subdirs = []
        with os.scandir(fd) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                child = f"{rel}/{entry.name}" if rel else entry.name
                out[child] = (_key(st), st)
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(entry.name)
        stack.append((rel, fd, subdirs))

    enter("", root_fd)
    while stack:
        rel, fd, subdirs = stack[-1]
        if not subdirs:
            os.close(fd)
            stack.pop()
            continue
        name = subdirs.pop()
        child_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=fd)
        enter(f"{rel}/{name}" if rel else name, child_fd)
    return out


class _At:
    """(dir fd, name) pairs for *at() calls on `rel` paths in two trees.

    Short paths go straight to the roots' fds; one longer than *at() accepts
    (PATH_MAX) is reached by opening its parent directories one by one."""

    LIMIT = 3800

    def __init__(self, upper_fd: int, layer_fd: int):
        self.fds = (upper_fd, layer_fd)
        self._cache: dict[tuple[int, str], int] = {}

    def __call__(self, rel: str, tree: int) -> tuple[int, str]:
        if len(rel) < self.LIMIT:
            return self.fds[tree], rel
        parent, _, name = rel.rpartition("/")
        key = (tree, parent)
        if key not in self._cache:
            fd = self.fds[tree]
            opened = os.open(".", os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            for comp in parent.split("/"):
                nxt = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=opened)
                os.close(opened)
                opened = nxt
            self._cache[key] = opened
        return self._cache[key], name

    def both(self, rel: str) -> tuple[int, int, str]:
        ufd, name = self(rel, 0)
        lfd, _ = self(rel, 1)
        return ufd, lfd, name

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)


def _parent(rel: str) -> str:
    return rel.rpartition("/")[0]


def _under(rel: str, dirs: set[str]) -> bool:
    """Is `rel` strictly below one of `dirs`?"""
    p = _parent(rel)
    while p:
        if p in dirs:
            return True
        p = _parent(p)
    return False


def sink_upper_into_layer(upper: Path, layer: Path, manifest: Manifest,
                          scan: dict[str, tuple[EntryKey, os.stat_result]] | None = None
                          ) -> tuple[SinkStats, Manifest]:
    """Write into the empty directory `layer` what changed in `upper` since `manifest`.

    Returns the stats and the new manifest. The caller freezes the sandbox
    around this call so that the upper does not change underneath.
    """
    scan = scan if scan is not None else scan_upper(upper)
    stats = SinkStats()
    prev = manifest.entries
    changed = [rel for rel, (key, _) in scan.items() if rel and prev.get(rel, 0) != key]
    # Gone from the upper but present in an earlier checkpoint layer: hide it,
    # unless its parent is gone too (the parent's own whiteout hides it).
    gone = [rel for rel in prev if rel and rel not in scan and _parent(rel) in scan
            and stat.S_ISDIR(scan[_parent(rel)][1].st_mode)]

    needed_dirs: set[str] = set()
    for rel in changed + gone:
        p = _parent(rel)
        while p and p not in needed_dirs:
            needed_dirs.add(p)
            p = _parent(p)
    for rel in changed:
        if stat.S_ISDIR(scan[rel][1].st_mode):
            needed_dirs.add(rel)

    layer_fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    at = _At(upper_fd, layer_fd)
    try:
        # An opaque mark hides every layer below, including this branch's earlier
        # checkpoint layers: keep it only for a directory that is new since the
        # last checkpoint (a recreated one usually has a new inode).
        opaque = {rel for rel in needed_dirs
                  if (prev.get(rel) in (None, 0) or prev[rel][0] != scan[rel][1].st_ino)
                  and _is_opaque(upper / rel)}
        # Whiteouts under a directory that is opaque in this layer are not needed,
        # and overlayfs would list them as phantom entries (an opaque directory
        # is read as a plain one).
        gone = [rel for rel in gone if not _under(rel, opaque)]
        # Directories first (parents before children), metadata after contents.
        for rel in sorted(needed_dirs, key=lambda r: r.count("/")):
            lfd, name = at(rel, 1)
            os.mkdir(name, 0o700, dir_fd=lfd)
        links: dict[tuple[int, int], str] = {}
        for rel in changed:
            st = scan[rel][1]
            if stat.S_ISDIR(st.st_mode):
                continue
            stats.changed += 1
            ident = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and ident in links:
                src_fd, src_name = at(links[ident], 1)
                lfd, name = at(rel, 1)
                os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=lfd,
                        follow_symlinks=False)
                continue
            _copy_entry(*at.both(rel), st, stats)
            if st.st_nlink > 1:
                links[ident] = rel
        for rel in gone:
            lfd, name = at(rel, 1)
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=lfd)
            stats.whiteouts += 1
        stats.changed += sum(1 for r in changed if r in needed_dirs)
        if prev.get("", 0) != scan[""][0]:
            stats.changed += 1  # the root's own metadata (chmod /, ...)
        # Root and directories get their metadata last: creating children
        # changed their mtimes. Deepest first, so a parent's mtime is final.
        for rel in sorted(needed_dirs | {""}, key=lambda r: r.count("/"), reverse=True):
            ufd, lfd, name = at.both(rel) if rel else (upper_fd, layer_fd, ".")
            _copy_metadata(ufd, lfd, name, scan[rel][1], keep_opaque=rel in opaque)
    finally:
        at.close()
        os.close(layer_fd)
        os.close(upper_fd)
    return stats, Manifest({rel: key for rel, (key, _) in scan.items()})


def _copy_entry(upper_fd: int, layer_fd: int, rel: str, st: os.stat_result,
                stats: SinkStats) -> None:
    _linux.clone_entry(upper_fd, layer_fd, rel, st)
    if stat.S_ISREG(st.st_mode):
        stats.cloned_bytes += st.st_size


def _copy_metadata(upper_fd: int, layer_fd: int, rel: str, st: os.stat_result,
                   keep_opaque: bool = True) -> None:
    _linux.copy_meta(upper_fd, layer_fd, rel, st, keep_opaque)


def _proc_path(dir_fd: int, rel: str) -> str:
    return f"/proc/self/fd/{dir_fd}/{rel}"


# ---- reading a chain -------------------------------------------------------------------

def _entry_stat(layer: Path, rel: str) -> os.stat_result | None:
    try:
        return os.lstat(layer / rel)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def lookup(chain: list[Path], rel: str) -> tuple[Path, os.stat_result] | None:
    """Resolve `rel` in a stack of layers (bottom first) as overlayfs would.

    Returns (layer, lstat) of the entry that is visible, or None.
    """
    parts = rel.split("/") if rel else []
    for layer in reversed(chain):
        # An ancestor that is a whiteout or a non-directory hides the path from
        # this layer down; an opaque ancestor stops the search below this layer.
        blocked = stop_below = False
        for i in range(1, len(parts)):
            st = _entry_stat(layer, "/".join(parts[:i]))
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                blocked = True
                break
            if _is_opaque(layer / "/".join(parts[:i])):
                stop_below = True
        if blocked:
            return None
        st = _entry_stat(layer, rel)
        if st is not None:
            return None if is_whiteout(st) else (layer, st)
        if stop_below:
            return None
    return None


def _layer_paths(layer: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(layer):
        base = os.path.relpath(dirpath, layer)
        base = "" if base == "." else base
        for n in dirnames + filenames:
            yield f"{base}/{n}" if base else n


def manifest_from_layers(layers: Iterable[Path]) -> Manifest:
    """A manifest with unknown keys for every path the given layers touch.

    Used after a daemon restart: the branch's own checkpoint layers name
    every path its upper held at the last checkpoint.
    """
    entries: dict[str, EntryKey | None] = {"": None}
    for layer in layers:
        for rel in _layer_paths(layer):
            entries[rel] = None
    return Manifest(entries)


def _same(a: tuple[Path, os.stat_result], b: tuple[Path, os.stat_result], rel: str) -> bool:
    (la, sa), (lb, sb) = a, b
    if la == lb:
        return True
    fields = ("st_mode", "st_uid", "st_gid", "st_rdev")
    if any(getattr(sa, f) != getattr(sb, f) for f in fields):
        return False
    if stat.S_ISDIR(sa.st_mode):
        return True  # a directory's own change shows as changes of its entries
    if sa.st_size != sb.st_size or sa.st_mtime_ns != sb.st_mtime_ns:
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(la / rel) == os.readlink(lb / rel)
    if stat.S_ISREG(sa.st_mode):
        return filecmp.cmp(la / rel, lb / rel, shallow=False)
    return True


def diff_chains(a: list[Path], b: list[Path]) -> list[tuple[str, str]]:
    """(path, 'added'|'modified'|'deleted') from chain a to chain b, sorted by path.

    Only layers the chains do not share can differ, so only their paths are
    examined: the cost follows the distance between a and b, not tree size.
    """
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    candidates: set[str] = set()
    for layer in a[common:] + b[common:]:
        candidates.update(_layer_paths(layer))
    # A directory opaque in a non-shared layer hides everything below it in the
    # layers under it, shared ones included: all of those paths may differ.
    for layer in a[common:] + b[common:]:
        for rel in [r for r in candidates if _is_opaque(layer / r)]:
            candidates.update(_descendants(a, rel))
            candidates.update(_descendants(b, rel))
    changes: dict[str, str] = {}
    for rel in sorted(candidates):
        ea, eb = lookup(a, rel), lookup(b, rel)
        if ea is None and eb is None:
            continue
        if ea is None or eb is None or _is_dir(ea) != _is_dir(eb):
            # Added or deleted (a type change is both): with everything below
            # it, wherever in the chain that lives, so the answer does not
            # depend on how the layers happen to be cut.
            if ea is not None:
                for sub in [rel, *_descendants(a, rel)]:
                    changes[sub] = "deleted"
            if eb is not None:
                for sub in [rel, *_descendants(b, rel)]:
                    changes[sub] = "modified" if changes.get(sub) == "deleted" else "added"
        elif not _same(ea, eb, rel):
            changes[rel] = "modified"
    return sorted(changes.items())


def _is_dir(entry: tuple[Path, os.stat_result]) -> bool:
    return stat.S_ISDIR(entry[1].st_mode)


def _descendants(chain: list[Path], rel: str) -> list[str]:
    """Every visible path below directory `rel` in the merged view of `chain`."""
    out: list[str] = []
    stack = [rel]
    while stack:
        d = stack.pop()
        instances = []
        for layer in reversed(chain):  # top first, cut at an opaque or non-dir instance
            st = _entry_stat(layer, d)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break
            instances.append(layer / d)
            if _is_opaque(layer / d):
                break
        if not instances or lookup(chain, d) is None:
            continue
        for name, found in _merged_entries(instances).items():
            child = f"{d}/{name}" if d else name
            out.append(child)
            if stat.S_ISDIR(os.lstat(found[0]).st_mode):
                stack.append(child)
    return out


def _merged_entries(dirs: list[Path]) -> dict[str, list[Path]]:
    """The visible entries of one merged directory.

    `dirs` are the instances of the directory in the layers, top first, already
    cut after the first opaque one. Returns name -> the instances of that entry
    (top first) that overlayfs merges: just one for a non-directory; for a
    directory, the directory instances down to an opaque one, a non-directory
    or a whiteout, which end the merge.
    """
    return {name: instances for name, (kind, instances) in _delta_entries(dirs).items()
            if kind != "whiteout"}


def _delta_entries(dirs: list[Path]) -> dict[str, tuple[str, list[Path]]]:
    """Like _merged_entries, for a stack of *delta* layers that will lie over
    others: name -> (kind, instances top first), kind one of 'whiteout' (hides
    what is below), 'file', 'dir' or 'opaque-dir' (hides what is below)."""
    result: dict[str, tuple[str, list[Path]]] = {}
    decided: set[str] = set()
    for d in dirs:
        for name in os.listdir(d):
            if name in decided:
                continue
            p = d / name
            st = os.lstat(p)
            is_dir = stat.S_ISDIR(st.st_mode)
            if name not in result:
                if is_whiteout(st):
                    result[name] = ("whiteout", [p])
                    decided.add(name)
                elif not is_dir:
                    result[name] = ("file", [p])
                    decided.add(name)
                elif _is_opaque(p):
                    result[name] = ("opaque-dir", [p])
                    decided.add(name)
                else:
                    result[name] = ("dir", [p])
                continue
            kind, instances = result[name]
            if is_dir and not is_whiteout(st):
                instances.append(p)
                if _is_opaque(p):
                    result[name] = ("opaque-dir", instances)
                    decided.add(name)
            else:
                # a whiteout or non-directory under a directory of the stack: the
                # directory hid it, and must go on hiding what lies below
                result[name] = ("opaque-dir", instances)
                decided.add(name)
    return result


def squash_deltas(chain: list[Path], layer: Path) -> int:
    """Flatten a stack of delta layers (bottom first) into one delta layer that,
    over the same base, shows the same tree: whiteouts and opaque marks that hide
    base content are kept. Files are reflinked. Returns the entries written.

    This is what keeps squashing cheap: its cost follows what the sandbox
    changed, not the size of the image below."""
    layer.mkdir()
    count = 0
    links: dict[tuple[int, int], Path] = {}
    # (dst, instances, under an opaque dir): whiteouts below an opaque directory
    # hide nothing and overlayfs would list them as phantom entries.
    stack: list[tuple[Path, list[Path], bool]] = [(layer, list(reversed(chain)), False)]
    dirs_done: list[tuple[Path, Path, bool]] = []
    while stack:
        dst_dir, src_dirs, hidden_below = stack.pop()
        for name, (kind, instances) in _delta_entries(src_dirs).items():
            dst, src = dst_dir / name, instances[0]
            st = os.lstat(src)
            if kind == "whiteout":
                if not hidden_below:
                    os.mknod(dst, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                    count += 1
                continue
            count += 1
            if kind in ("dir", "opaque-dir"):
                os.mkdir(dst, 0o700)
                stack.append((dst, instances, hidden_below or kind == "opaque-dir"))
                dirs_done.append((dst, src, kind == "opaque-dir"))
            else:
                ident = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and ident in links:
                    os.link(links[ident], dst, follow_symlinks=False)
                    continue
                _clone_path(src, dst_dir, name, st)
                if st.st_nlink > 1:
                    links[ident] = dst
    top = list(reversed(chain))[0]
    for dst_dir, src_dir, opaque in reversed(dirs_done + [(layer, top, False)]):
        _copy_dir_meta_paths(src_dir, dst_dir, os.lstat(src_dir))
        if opaque:
            os.setxattr(dst_dir, OPAQUE_XATTR, b"y")
    return count


def _clone_path(src: Path, dst_dir: Path, name: str, st: os.stat_result) -> None:
    src_fd = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dst_fd = os.open(dst_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if src.name == name:
            _copy_entry(src_fd, dst_fd, name, st, SinkStats())
        else:
            raise ValueError(f"{src} != {name}")
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def _copy_dir_meta_paths(src_dir: Path, dst_dir: Path, st: os.stat_result) -> None:
    pfd = os.open(src_dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dfd = os.open(dst_dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _copy_dir_meta(pfd, src_dir.name, dfd, dst_dir.name, st)
    finally:
        os.close(pfd)
        os.close(dfd)


def squash_chain(chain: list[Path], layer: Path) -> int:
    """Flatten a chain (bottom first) into the new directory `layer`; returns entries.

    Resolves whiteouts and opaque directories as overlayfs does and reflinks
    regular files from the layer that shows them, so no file data is copied.
    Hardlinks inside one source layer stay hardlinks.
    """
    layer.mkdir()
    count = 0
    links: dict[tuple[int, int], Path] = {}
    stack: list[tuple[Path, list[Path]]] = [(layer, list(reversed(chain)))]
    top_dirs = []
    while stack:
        dst_dir, src_dirs = stack.pop()
        top_dirs.append((dst_dir, src_dirs[0]))
        for name, instances in _merged_entries(src_dirs).items():
            src, dst = instances[0], dst_dir / name
            st = os.lstat(src)
            count += 1
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dst, 0o700)
                stack.append((dst, instances))
                continue
            ident = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and ident in links:
                os.link(links[ident], dst, follow_symlinks=False)
                continue
            src_fd = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            dst_fd = os.open(dst_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _copy_entry(src_fd, dst_fd, name, st, SinkStats())
            finally:
                os.close(src_fd)
                os.close(dst_fd)
            if st.st_nlink > 1:
                links[ident] = dst
    # Directory metadata last (children changed the mtimes), deepest first; an
    # opaque mark is meaningless in a single layer and is not copied.
    for dst_dir, src_dir in reversed(top_dirs):
        st = os.lstat(src_dir)
        pfd = os.open(src_dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        dfd = os.open(dst_dir.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _copy_dir_meta(pfd, src_dir.name, dfd, dst_dir.name, st)
        finally:
            os.close(pfd)
            os.close(dfd)
    return count


def _copy_dir_meta(src_parent: int, src_name: str, dst_parent: int, dst_name: str,
                   st: os.stat_result) -> None:
    os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_parent, follow_symlinks=False)
    os.chmod(dst_name, stat.S_IMODE(st.st_mode), dir_fd=dst_parent)
    src, dst = _proc_path(src_parent, src_name), _proc_path(dst_parent, dst_name)
    for name in os.listxattr(src, follow_symlinks=False):
        if not name.startswith(OVERLAY_XATTR_PREFIX):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)
    os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_parent,
             follow_symlinks=False)
