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

The walks below a tree's root are `deltabox.core.fdwalk`'s: fd-relative, never following
a symlink (uppers and layers are written by root inside a sandbox; see docs/security.md).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from deltabox.host import linux
from deltabox.core.fdwalk import (OPAQUE_XATTR, Tree, copy_dir_meta, data_extents, proc_fd_path,
                                    walk_tree)
from deltabox.errors import Internal, NotFound

__all__ = ["Manifest", "SinkStats", "scan_upper", "sink_upper_into_layer", "lookup",
           "diff_chains", "manifest_from_layers", "squash_chain", "squash_deltas", "is_whiteout",
           "INTERNAL_DIR", "is_internal"]

# The daemon's own directory inside every sandbox's tree (the init's copy of itself,
# /.deltabox/fork-index of a fork's child): it is sunk with the rest -- a restore needs it
# -- but is none of the user's changes (`diff_chains` leaves it out).
INTERNAL_DIR = ".deltabox"

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

    Walks with directory fds (see `walk_tree`): nothing is followed and paths longer than
    PATH_MAX are fine."""
    fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        root_st = os.fstat(fd)
        out: dict[str, tuple[EntryKey, os.stat_result]] = {"": (_key(root_st), root_st)}
        for rel, st, _, _ in walk_tree(fd):
            out[rel] = (_key(st), st)
    finally:
        os.close(fd)
    return out


def is_internal(rel: str) -> bool:
    """Whether the relative path `rel` is the daemon's (`INTERNAL_DIR` or below it)."""
    return rel == INTERNAL_DIR or rel.startswith(INTERNAL_DIR + "/")


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
    # A hardlink group is sunk whole: its names can only be links within one layer, and
    # a name whose key did not change (its partner was renamed, or moved with a renamed
    # directory) would otherwise stay a separate file in an older layer.
    groups: dict[int, list[str]] = {}
    for rel, (_, st) in scan.items():
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            groups.setdefault(st.st_ino, []).append(rel)
    if groups:
        more = {other for rel in changed for other in groups.get(scan[rel][1].st_ino, ())
                if not stat.S_ISDIR(scan[rel][1].st_mode)} - set(changed)
        changed += [rel for rel in scan if rel in more]
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

    # The sandbox is frozen, yet the upper is still reached only through `Tree.at`: a
    # single name below a parent opened without following symlinks.
    up, out = Tree(upper), Tree(layer)
    try:
        # An opaque mark hides every layer below, including this branch's earlier
        # checkpoint layers: keep it only for a directory that is new since the
        # last checkpoint (a recreated one usually has a new inode).
        opaque = {rel for rel in needed_dirs
                  if (prev.get(rel) in (None, 0) or prev[rel][0] != scan[rel][1].st_ino)
                  and up.is_opaque(rel)}
        # Whiteouts under a directory that is opaque in this layer are not needed,
        # and overlayfs would list them as phantom entries (an opaque directory
        # is read as a plain one).
        gone = [rel for rel in gone if not _under(rel, opaque)]
        # Directories first (parents before children), metadata after contents.
        for rel in sorted(needed_dirs, key=lambda r: r.count("/")):
            lfd, name = out.at(rel)
            os.mkdir(name, 0o700, dir_fd=lfd)
        links: dict[tuple[int, int], str] = {}
        for rel in changed:
            st = scan[rel][1]
            if stat.S_ISDIR(st.st_mode):
                continue
            stats.changed += 1
            _copy_linked(up, out, rel, st, links, stats)
        for rel in gone:
            lfd, name = out.at(rel)
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=lfd)
            stats.whiteouts += 1
        stats.changed += sum(1 for r in changed if r in needed_dirs)
        if prev.get("", 0) != scan[""][0]:
            stats.changed += 1  # the root's own metadata (chmod /, ...)
        # Root and directories get their metadata last: creating children
        # changed their mtimes. Deepest first, so a parent's mtime is final.
        for rel in sorted(needed_dirs | {""}, key=lambda r: r.count("/"), reverse=True):
            ufd, name = up.at(rel)
            _copy_metadata(ufd, out.at(rel)[0], name, scan[rel][1], keep_opaque=rel in opaque)
    finally:
        up.close()
        out.close()
    return stats, Manifest({rel: key for rel, (key, _) in scan.items()})


def _copy_entry(upper_fd: int, layer_fd: int, rel: str, st: os.stat_result,
                stats: SinkStats) -> None:
    linux.clone_entry(upper_fd, layer_fd, rel, st)
    if stat.S_ISREG(st.st_mode):
        # What the file stores, not its size: a sparse file's size is free to make
        # (`truncate -s 8E` overflowed the layer's size column: every checkpoint failed).
        stats.cloned_bytes += st.st_blocks * 512


def _copy_metadata(upper_fd: int, layer_fd: int, rel: str, st: os.stat_result,
                   keep_opaque: bool = True) -> None:
    linux.copy_meta(upper_fd, layer_fd, rel, st, keep_opaque)


def _link(tree: Tree, existing: str, new: str) -> None:
    """Hardlink `new` to `existing`, both in `tree` (one the daemon is writing)."""
    src_fd, src_name = tree.at(existing)
    dst_fd, dst_name = tree.at(new)
    os.link(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)


# ---- reading a chain -------------------------------------------------------------------

class _Chain:
    """A stack of trees (bottom first) read as overlayfs merges them."""

    def __init__(self, trees: list[Tree]):
        self.trees = trees
        self._dirs: dict[str, list[Tree]] = {"": list(reversed(trees))}

    def dir_instances(self, rel: str) -> list[Tree]:
        """The trees whose instance of directory `rel` overlayfs merges, top first: down
        to an opaque one, or to a whiteout or non-directory, which end the merge. []
        if `rel` is not a visible directory."""
        todo, d = [], rel
        while d not in self._dirs:
            todo.append(d)
            d = _parent(d)
        for d in reversed(todo):  # parents first: no recursion, however deep
            merged: list[Tree] = []
            for tree in self._dirs[_parent(d)]:
                found = tree.entry(d)
                if found is None:
                    continue
                st, opaque = found
                if not stat.S_ISDIR(st.st_mode):
                    break
                merged.append(tree)
                if opaque:
                    break
            self._dirs[d] = merged
        return self._dirs[rel]

    def lookup(self, rel: str) -> tuple[Tree, os.stat_result] | None:
        """(tree, lstat) of the entry that is visible at `rel`, or None."""
        if not rel:
            top = self.trees[-1]
            return top, os.fstat(top.fd)
        for tree in self.dir_instances(_parent(rel)):
            found = tree.entry(rel)
            if found is not None:
                return None if is_whiteout(found[0]) else (tree, found[0])
        return None

    def descendants(self, rel: str) -> list[str]:
        """Every visible path below directory `rel` in the merged view."""
        out: list[str] = []
        stack = [(rel, self.dir_instances(rel))]
        while stack:
            d, instances = stack.pop()
            for name, (kind, below) in _delta_entries(d, instances).items():
                if kind == "whiteout":
                    continue
                child = f"{d}/{name}" if d else name
                out.append(child)
                if kind != "file":
                    self._dirs.setdefault(child, below)
                    stack.append((child, below))
        return out


def _open_trees(paths: Iterable[Path], trees: dict[Path, Tree]) -> list[Tree]:
    """Open each path once (shared layers are one `Tree`), into `trees`."""
    out = []
    for p in paths:
        if p not in trees:
            trees[p] = Tree(p)
        out.append(trees[p])
    return out


def _close_trees(trees: dict[Path, Tree]) -> None:
    for t in trees.values():
        t.close()


def lookup(chain: list[Path], rel: str) -> tuple[Path, os.stat_result] | None:
    """Resolve `rel` in a stack of layers (bottom first) as overlayfs would.

    Returns (layer, lstat) of the entry that is visible, or None.
    """
    trees: dict[Path, Tree] = {}
    try:
        found = _Chain(_open_trees(chain, trees)).lookup(rel)
        return None if found is None else (found[0].path, found[1])
    finally:
        _close_trees(trees)


def manifest_from_layers(layers: Iterable[Path]) -> Manifest:
    """A manifest with unknown keys for every path the given layers touch.

    Used after a daemon restart: the branch's own checkpoint layers name
    every path its upper held at the last checkpoint.
    """
    entries: dict[str, EntryKey | None] = {"": None}
    for layer in layers:
        fd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for rel, _, _, _ in walk_tree(fd):
                entries[rel] = None
        finally:
            os.close(fd)
    return Manifest(entries)


def _same(a: tuple[Tree, os.stat_result], b: tuple[Tree, os.stat_result], rel: str) -> bool:
    (ta, sa), (tb, sb) = a, b
    if ta is tb:
        return True
    fields = ("st_mode", "st_uid", "st_gid", "st_rdev")
    if any(getattr(sa, f) != getattr(sb, f) for f in fields):
        return False
    if stat.S_ISDIR(sa.st_mode):
        return True  # a directory's own change shows as changes of its entries
    if sa.st_size != sb.st_size or sa.st_mtime_ns != sb.st_mtime_ns:
        return False
    if stat.S_ISLNK(sa.st_mode):
        target = ta.readlink(rel)
        return target is not None and target == tb.readlink(rel)
    if stat.S_ISREG(sa.st_mode):
        return _same_content(ta, tb, rel)
    return True


def _same_content(ta: Tree, tb: Tree, rel: str) -> bool:
    """Do the regular files at `rel` hold the same bytes? (False if either one is not a
    regular file any more: a live upper changed under the diff)"""
    fa = ta.open_regular(rel)
    if fa is None:
        return False
    try:
        fb = tb.open_regular(rel)
        if fb is None:
            return False
        try:
            return _same_bytes(fa, fb)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _same_bytes(fa: int, fb: int) -> bool:
    """Two open regular files of the same size: the same bytes? Only the ranges where
    either holds data are read (a hole in both is zeros in both): a sandbox's
    `truncate -s 8E` is compared in no time, not read for centuries."""
    if os.fstat(fa).st_size != os.fstat(fb).st_size:
        return False
    ranges = sorted(data_extents(fa) + data_extents(fb))
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        off = start
        while off < end:
            n = min(1 << 20, end - off)
            x, y = os.pread(fa, n, off), os.pread(fb, n, off)
            if x != y:
                return False
            if len(x) < n:  # shorter than its extents said: changed while read
                return False
            off += n
    return True


def diff_chains(a: list[Path], b: list[Path]) -> list[tuple[str, str]]:
    """(path, 'added'|'modified'|'deleted') from chain a to chain b, sorted by path.

    Only layers the chains do not share can differ, so only their paths are
    examined: the cost follows the distance between a and b, not tree size.

    The daemon's own files (`INTERNAL_DIR`) are no user change and are not listed.

    Either chain may end in a live sandbox's upper, which its processes change under the
    walk: every path is resolved below a tree's fd (see `Tree`), so a directory swapped
    for a symlink shows up as a change or not at all, never as a walk outside the tree.
    Errors name sandbox paths only, never the store's.
    """
    trees: dict[Path, Tree] = {}
    try:
        try:
            ta, tb = _open_trees(a, trees), _open_trees(b, trees)
        except FileNotFoundError:
            raise NotFound("a layer of the compared chains is gone (its checkpoint or "
                           "sandbox was deleted meanwhile)") from None
        return [c for c in _diff(_Chain(ta), _Chain(tb)) if not is_internal(c[0])]
    except OSError as e:
        raise _client_error(e, "diff") from None
    finally:
        _close_trees(trees)


def _client_error(e: OSError, what: str) -> Internal:
    """`e` for a client: the store's host paths stay out of the message; a path relative
    to a tree (what `open_beneath` reports) is a sandbox path."""
    where = e.filename if isinstance(e.filename, str) else ""
    text = e.strerror or type(e).__name__
    if where and not where.startswith("/"):
        text += f" at /{where}"
    return Internal(f"{what} failed: {text}")


def _diff(a: _Chain, b: _Chain) -> list[tuple[str, str]]:
    common = 0
    while common < min(len(a.trees), len(b.trees)) and a.trees[common] is b.trees[common]:
        common += 1
    candidates: set[str] = set()
    opaque: set[str] = set()
    for tree in dict.fromkeys(a.trees[common:] + b.trees[common:]):
        for rel, _, is_opaque in tree.walk():
            candidates.add(rel)
            if is_opaque:
                opaque.add(rel)
    # A directory opaque in a non-shared layer hides everything below it in the
    # layers under it, shared ones included: all of those paths may differ.
    for rel in opaque:
        candidates.update(a.descendants(rel))
        candidates.update(b.descendants(rel))
    changes: dict[str, str] = {}
    for rel in sorted(candidates):
        ea, eb = a.lookup(rel), b.lookup(rel)
        if ea is None and eb is None:
            continue
        if ea is None or eb is None or _is_dir(ea) != _is_dir(eb):
            # Added or deleted (a type change is both): with everything below
            # it, wherever in the chain that lives, so the answer does not
            # depend on how the layers happen to be cut.
            if ea is not None:
                for sub in [rel, *(a.descendants(rel) if _is_dir(ea) else [])]:
                    changes[sub] = "deleted"
            if eb is not None:
                for sub in [rel, *(b.descendants(rel) if _is_dir(eb) else [])]:
                    changes[sub] = "modified" if changes.get(sub) == "deleted" else "added"
        elif not _same(ea, eb, rel):
            changes[rel] = "modified"
    return sorted(changes.items())


def _is_dir(entry: tuple[Tree, os.stat_result]) -> bool:
    return stat.S_ISDIR(entry[1].st_mode)


def _delta_entries(rel: str, dirs: list[Tree]) -> dict[str, tuple[str, list[Tree]]]:
    """The entries of directory `rel` merged over `dirs` (the trees holding an instance
    of it, top first, already cut after the first opaque one), for a stack of *delta*
    layers that will lie over others: name -> (kind, the trees of that entry's instances,
    top first), kind one of 'whiteout' (hides what is below), 'file', 'dir' or
    'opaque-dir' (hides what is below). A directory's instances run down to an opaque
    one, a non-directory or a whiteout, which end the merge."""
    result: dict[str, tuple[str, list[Tree]]] = {}
    decided: set[str] = set()
    for tree in dirs:
        for name, st, opaque in tree.listdir(rel):
            if name in decided:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if name not in result:
                if is_whiteout(st):
                    result[name] = ("whiteout", [tree])
                    decided.add(name)
                elif not is_dir:
                    result[name] = ("file", [tree])
                    decided.add(name)
                elif opaque:
                    result[name] = ("opaque-dir", [tree])
                    decided.add(name)
                else:
                    result[name] = ("dir", [tree])
                continue
            kind, instances = result[name]
            if is_dir:
                instances.append(tree)
                if opaque:
                    result[name] = ("opaque-dir", instances)
                    decided.add(name)
            else:
                # a whiteout or non-directory under a directory of the stack: the
                # directory hid it, and must go on hiding what lies below
                result[name] = ("opaque-dir", instances)
                decided.add(name)
    return result


def _copy_linked(src: Tree, out: Tree, rel: str, st: os.stat_result,
                 links: dict[tuple[int, int], str], stats: SinkStats) -> None:
    """Recreate the non-directory `rel` of `src` in `out` (regular files reflinked); a
    further name of an inode already copied (`links`: inode -> first name) becomes a
    hard link to it, so hardlink groups stay groups."""
    ident = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and ident in links:
        _link(out, links[ident], rel)
        return
    src_fd, name = src.at(rel)
    _copy_entry(src_fd, out.at(rel)[0], name, st, stats)
    if st.st_nlink > 1:
        links[ident] = rel


def _copy_dir_meta_at(src: Tree, out: Tree, rel: str, opaque: bool = False) -> None:
    src_fd, name = src.at(rel)
    dst_fd, _ = out.at(rel)
    copy_dir_meta(src_fd, name, dst_fd, name, os.stat(name, dir_fd=src_fd,
                                                        follow_symlinks=False))
    if opaque:
        os.setxattr(proc_fd_path(dst_fd, name), OPAQUE_XATTR, b"y", follow_symlinks=False)


def squash_deltas(chain: list[Path], layer: Path) -> int:
    """Flatten a stack of delta layers (bottom first) into one delta layer that,
    over the same base, shows the same tree: whiteouts and opaque marks that hide
    base content are kept. Files are reflinked. Returns the entries written.

    This is what keeps squashing cheap: its cost follows what the sandbox
    changed, not the size of the image below."""
    return _flatten(chain, layer, keep_hiding=True)


def squash_chain(chain: list[Path], layer: Path) -> int:
    """Flatten a chain (bottom first) into the new directory `layer`; returns entries.

    Resolves whiteouts and opaque directories as overlayfs does and reflinks
    regular files from the layer that shows them, so no file data is copied.
    Hardlinks inside one source layer stay hardlinks."""
    return _flatten(chain, layer, keep_hiding=False)


def _flatten(chain: list[Path], layer: Path, keep_hiding: bool) -> int:
    """The one walk of both squashes: the merged tree of `chain` (bottom first) written
    into the new directory `layer`, files reflinked; returns the entries written.

    `keep_hiding`: the result lies over a base (`squash_deltas`), so whiteouts and opaque
    marks stay -- except whiteouts below an opaque directory, which hide nothing and
    overlayfs would list as phantom entries. Without it (`squash_chain`) nothing lies
    below: whiteouts are dropped and an opaque mark, meaningless in a single layer, is
    not copied."""
    layer.mkdir()
    trees: dict[Path, Tree] = {}
    try:
        src = list(reversed(_open_trees(chain, trees)))
        out = trees.setdefault(layer, Tree(layer))
        count = 0
        links: dict[tuple[int, int], str] = {}
        # (dir, its instances top first, whether it lies under an opaque dir)
        stack: list[tuple[str, list[Tree], bool]] = [("", src, False)]
        # (dir, the tree its metadata comes from, its opaque mark), parents first
        dirs: list[tuple[str, Tree, bool]] = [("", src[0], False)]
        while stack:
            d, instances_of_d, hidden_below = stack.pop()
            for name, (kind, instances) in _delta_entries(d, instances_of_d).items():
                if kind == "whiteout" and not keep_hiding:
                    continue
                rel = f"{d}/{name}" if d else name
                found = instances[0].entry(rel)
                if found is None:
                    continue
                fd, _ = out.at(rel)
                if kind == "whiteout":
                    if not hidden_below:
                        os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)
                        count += 1
                    continue
                count += 1
                if kind != "file":
                    opaque = keep_hiding and kind == "opaque-dir"
                    os.mkdir(name, 0o700, dir_fd=fd)
                    stack.append((rel, instances, hidden_below or opaque))
                    dirs.append((rel, instances[0], opaque))
                    continue
                _copy_linked(instances[0], out, rel, found[0], links, SinkStats())
        # Directory metadata last (creating children changed the mtimes), children
        # before their parents.
        for rel, tree, opaque in reversed(dirs):
            _copy_dir_meta_at(tree, out, rel, opaque)
        return count
    finally:
        _close_trees(trees)
