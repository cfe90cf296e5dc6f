"""The store: immutable layers, images, branches and their metadata.

Vocabulary
----------
layer
    An immutable directory tree in overlayfs format (whiteouts are 0:0 char
    devices, opaque dirs carry ``trusted.overlay.opaque=y``). Image layers come
    from an import; checkpoint layers (DeltaFS) from sinking a branch's upper.
    Once committed a layer never changes; it is deleted when nothing refers to it.
image
    A name for an ordered list of layers (bottom first).
branch
    A writable overlay: ``lower`` = a chain of layers, ``upper``/``work`` =
    fresh directories. A sandbox runs on exactly one branch; rollback and fork
    (DeltaFS) make new branches over a checkpoint's chain.
checkpoint
    (DeltaFS/DeltaCR issues) an immutable node of a sandbox's snapshot tree: a
    layer chain, plus a process image in full mode. A full checkpoint whose
    processes turn out not to restore is marked *unusable* (with CRIU's reason):
    its content never changes, what is known about it may.
body double
    (DeltaCR) a checkpoint restored ahead of time, stopped, on its own branch.

Lifecycle and durability
------------------------
The SQLite database (WAL) is the truth. Every state transition is one
transaction. New directories are built under ``tmp/new-XXXX`` and renamed into
place inside the transaction; a deletion removes the row first, commits, and
only then deletes the directory. At start-up `reconcile_disk` deletes anything
on disk that the database does not know.

The store returns mounts as data (`Mount`); callers perform them. So lineage
and bookkeeping are testable without root.

Layout under the store root (an XFS filesystem with reflink)::

    meta.db                   metadata
    layers/<layer-id>/        immutable layers
    branches/<branch-id>/{upper,work}   an XFS project each: the sandbox's disk limit
    mnt/<branch-id>/          where a branch's overlay is mounted
    tmp/                      work in progress (new-XXXX), wiped at start-up
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import structlog

from deltabox.host import linux
from deltabox.core import deltafs
from deltabox.host.quota import DiskLimit, ProjectQuotas, kernel_has_xfs_quota, super_options
from deltabox.errors import (AlreadyExists, CheckpointNotFound, FailedPrecondition, ImageNotFound,
                             InvalidArgument, NotFound, SandboxNotFound)
from deltabox.faults import crash_point

__all__ = ["Store", "Mount", "ImageRecord", "SandboxRecord", "BranchRecord", "CheckpointRecord",
           "CheckpointInUse", "ensure_backing", "validate_name", "new_id"]

log = structlog.get_logger("deltabox.store.metadata")

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class CheckpointInUse(FailedPrecondition):
    """A deletion found checkpoints that operations in flight build on (see
    `Store.delete_checkpoint`); nothing was deleted."""

    def __init__(self, checkpoint_ids: list[str]):
        super().__init__(f"checkpoint(s) {', '.join(checkpoint_ids)} are in use by a rollback, "
                         "fork or warm-up in flight")
        self.checkpoint_ids = checkpoint_ids


def validate_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(f"invalid {what} name {name!r}: use 1-63 characters "
                              "[a-z0-9_.-], starting with a letter or digit")
    return name


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class Mount:
    """An overlay mount described as data; `mount()` performs it."""
    target: str
    lowers: tuple[str, ...]   # bottom first
    upper: str | None
    work: str | None
    options: tuple[str, ...]

    def mount(self) -> None:
        linux.mount_overlay(self.target, list(self.lowers), self.upper, self.work,
                             self.options, readonly=self.upper is None)


@dataclass(frozen=True)
class ImageRecord:
    name: str
    layer_ids: tuple[str, ...]  # bottom first
    created_at: float
    source: str
    source_format: str
    size_bytes: int


@dataclass(frozen=True)
class BranchRecord:
    id: str
    lower: tuple[str, ...]  # layer ids, bottom first
    created_at: float


@dataclass
class SandboxRecord:
    id: str
    name: str
    image: str
    state: str  # creating | running | stopped | broken
    branch_id: str
    created_at: float
    spec: dict = field(default_factory=dict)  # limits, network, env, hostname
    init_pid: int = 0
    init_start: float = 0.0  # process start time: a pid alone may be reused
    head: str = ""  # the checkpoint the sandbox's state descends from ("" = the image)


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    sandbox_id: str         # the sandbox it was taken of
    parent_id: str          # "" for the first checkpoint of an image-based sandbox
    label: str
    mode: str               # "fs" or "full"
    created_at: float
    layers: tuple[str, ...]  # the chain as sunk, bottom first (older ids may be freed)
    mount: tuple[str, ...]   # an equal chain to mount (base + one squashed layer, once squashed)
    squashed: str           # the squashed layer in `mount`, once squashed
    pinned: bool
    stats: dict
    image: str
    spec: dict              # the sandbox's spec at checkpoint time (for fork)
    # FULL: why its processes cannot be restored ("" = not known to be broken), and
    # the CRIU build that found it (another build may restore it: see SandboxManager).
    unusable_reason: str = ""
    unusable_criu: str = ""

    @property
    def restorable(self) -> bool:
        return not self.unusable_reason

    @property
    def mount_layers(self) -> tuple[str, ...]:
        """What a branch over this checkpoint mounts (shorter once squashed)."""
        return self.mount


# --------------------------------------------------------------------------------------
# Backing filesystem
# --------------------------------------------------------------------------------------

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
                f.truncate(_parse_size(image_size))
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


def read_instance_id(state_dir: Path) -> str | None:
    """The instance id of the store under `state_dir` (it names the store's
    cgroups), read without opening the store; None if there is none (yet)."""
    db = state_dir / "store" / "meta.db"
    if not db.exists():
        return None
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()
    except sqlite3.Error:
        row = None
    finally:
        conn.close()
    return row[0] if row else None


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


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise InvalidArgument(f"invalid size {text!r} (e.g. 512M, 64G)")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


# --------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, size_bytes INTEGER NOT NULL,
    origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY, layer_ids TEXT NOT NULL, created_at REAL NOT NULL,
    source TEXT NOT NULL, source_format TEXT NOT NULL, size_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS branches (
    id TEXT PRIMARY KEY, lower TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, image TEXT NOT NULL,
    state TEXT NOT NULL, branch_id TEXT NOT NULL REFERENCES branches(id),
    created_at REAL NOT NULL, spec TEXT NOT NULL,
    init_pid INTEGER NOT NULL DEFAULT 0, init_start REAL NOT NULL DEFAULT 0,
    head TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, parent_id TEXT NOT NULL,
    label TEXT NOT NULL, mode TEXT NOT NULL, created_at REAL NOT NULL,
    layers TEXT NOT NULL, mount TEXT NOT NULL, squashed TEXT NOT NULL DEFAULT '',
    pinned INTEGER NOT NULL DEFAULT 0, stats TEXT NOT NULL DEFAULT '{}',
    image TEXT NOT NULL, spec TEXT NOT NULL,
    unusable TEXT NOT NULL DEFAULT '', unusable_criu TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS checkpoints_parent ON checkpoints(parent_id);
CREATE INDEX IF NOT EXISTS checkpoints_sandbox ON checkpoints(sandbox_id);
"""


class Store:
    def __init__(self, root: Path, durable: bool = False):
        self.root = root
        self.durable = durable
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
        # One connection, serialised by a lock: callers run in a thread pool.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(root / "meta.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a crash of the daemon (the promise we
        # make); FULL (durable=True) also fsyncs each commit against power loss.
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
            self._check_schema_version()
        except BaseException:
            self._db.close()  # an open DB would keep the store busy (no unmount)
            raise

    def _add_missing_columns(self) -> None:
        """Columns added since schema version 1 (additive, with defaults: a store
        written before them reads as if nothing had been marked)."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(checkpoints)")}
        for col in ("unusable", "unusable_criu"):
            if col not in have:
                self._db.execute(f"ALTER TABLE checkpoints ADD COLUMN {col} TEXT NOT NULL "
                                 "DEFAULT ''")

    def _check_schema_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"store schema version {row[0]} is not {SCHEMA_VERSION}; "
                               "refusing to touch it")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('instance_id', ?)",
                         (secrets.token_hex(4),))
        self.instance_id = self._db.execute(
            "SELECT value FROM meta WHERE key='instance_id'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One state transition: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- new directories -------------------------------------------------------------

    def new_tmp_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="new-", dir=self.tmp_dir))

    def layer_path(self, layer_id: str) -> Path:
        return self.layers_dir / layer_id

    # ---- layers & images -------------------------------------------------------------

    def commit_image(self, name: str, layer_dirs: list[Path], source: str,
                     source_format: str, replace: bool = False) -> ImageRecord:
        """Turn finished tmp dirs into layers and record the image, in one transaction."""
        now = time.time()
        layer_ids = [new_id("l") for _ in layer_dirs]
        sizes = [_tree_size(d) for d in layer_dirs]
        moved: list[tuple[Path, Path]] = []
        old_layers: list[str] = []
        try:
            with self.transaction() as db:
                row = db.execute("SELECT layer_ids FROM images WHERE name=?", (name,)).fetchone()
                if row is not None:
                    if not replace:
                        raise AlreadyExists(f"image {name!r} exists (use replace)")
                    if db.execute("SELECT 1 FROM sandboxes WHERE image=? LIMIT 1",
                                  (name,)).fetchone():
                        raise FailedPrecondition(f"image {name!r} is used by sandboxes")
                    old_layers = json.loads(row[0])
                    db.execute("DELETE FROM images WHERE name=?", (name,))
                for lid, d, size in zip(layer_ids, layer_dirs, sizes):
                    db.execute("INSERT INTO layers VALUES (?,?,?,?)", (lid, now, size,
                                                                       f"image:{name}"))
                    d.rename(self.layer_path(lid))
                    moved.append((self.layer_path(lid), d))
                db.execute("INSERT INTO images VALUES (?,?,?,?,?,?)",
                           (name, json.dumps(layer_ids), now, source, source_format, sum(sizes)))
                self._drop_unused_layers(db, old_layers)
                crash_point("import.commit")
        except BaseException:
            for dst, src in moved:  # the rows are gone: put the dirs back for clean-up
                dst.rename(src)
            raise
        self.delete_unreferenced_layer_dirs()
        return ImageRecord(name, tuple(layer_ids), now, source, source_format, sum(sizes))

    def _drop_unused_layers(self, db: sqlite3.Connection, candidates: list[str]) -> None:
        used = self._used_layers(db)
        for lid in candidates:
            if lid not in used:
                db.execute("DELETE FROM layers WHERE id=?", (lid,))

    @staticmethod
    def _used_layers(db: sqlite3.Connection) -> set[str]:
        used: set[str] = set()
        for (ids,) in db.execute("SELECT layer_ids FROM images"):
            used.update(json.loads(ids))
        for (ids,) in db.execute("SELECT lower FROM branches"):
            used.update(json.loads(ids))
        for ids, squashed in db.execute("SELECT mount, squashed FROM checkpoints"):
            used.update(json.loads(ids))
            if squashed:
                used.add(squashed)
        # A live branch's own checkpoint layers name the paths its next sink
        # must whiteout after a restart (see SandboxManager._recover_manifest).
        for (ids,) in db.execute("SELECT c.layers FROM checkpoints c JOIN sandboxes s "
                                 "ON s.head = c.id"):
            used.update(json.loads(ids))
        return used

    def delete_unreferenced_layer_dirs(self) -> None:
        """Delete layer directories without a row (after a commit dropped them)."""
        known = {r[0] for r in self._query("SELECT id FROM layers")}
        for d in self.layers_dir.iterdir():
            if d.name not in known:
                _rmtree(d)

    def get_image(self, name: str) -> ImageRecord:
        rows = self._query("SELECT * FROM images WHERE name=?", (name,))
        if not rows:
            raise ImageNotFound(f"no image named {name!r}")
        return _image(rows[0])

    def list_images(self) -> list[ImageRecord]:
        return [_image(r) for r in self._query("SELECT * FROM images ORDER BY name")]

    def remove_image(self, name: str) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT layer_ids FROM images WHERE name=?", (name,)).fetchone()
            if row is None:
                raise ImageNotFound(f"no image named {name!r}")
            users = [r[0] for r in db.execute("SELECT name FROM sandboxes WHERE image=?", (name,))]
            if users:
                raise FailedPrecondition(f"image {name!r} is used by sandboxes: {', '.join(users)}")
            db.execute("DELETE FROM images WHERE name=?", (name,))
            self._drop_unused_layers(db, json.loads(row[0]))
        self.delete_unreferenced_layer_dirs()

    # ---- branches & sandboxes --------------------------------------------------------

    def create_sandbox(self, name: str, image: str, spec: dict,
                       from_checkpoint: str = "") -> SandboxRecord:
        """Record a sandbox in state 'creating' with a fresh branch over the image
        (or over a checkpoint's chain, for a fork)."""
        if from_checkpoint:
            lower = self.get_checkpoint(from_checkpoint).mount_layers
        else:
            lower = self.get_image(image).layer_ids
        tmp = self._new_branch_tmp(tuple(lower), spec)
        sbx = SandboxRecord(id=new_id("sbx"), name=name, image=image, state="creating",
                            branch_id=new_id("br"), created_at=time.time(), spec=spec,
                            head=from_checkpoint)
        try:
            with self.transaction() as db:
                if db.execute("SELECT 1 FROM sandboxes WHERE name=?", (name,)).fetchone():
                    raise AlreadyExists(f"a sandbox named {name!r} exists")
                if from_checkpoint and not db.execute(
                        "SELECT 1 FROM checkpoints WHERE id=?", (from_checkpoint,)).fetchone():
                    raise CheckpointNotFound(f"checkpoint {from_checkpoint} was deleted")
                db.execute("INSERT INTO branches VALUES (?,?,?)",
                           (sbx.branch_id, json.dumps(list(lower)), sbx.created_at))
                db.execute("INSERT INTO sandboxes (id,name,image,state,branch_id,created_at,spec,"
                           "head) VALUES (?,?,?,?,?,?,?,?)",
                           (sbx.id, name, image, sbx.state, sbx.branch_id, sbx.created_at,
                            json.dumps(spec), from_checkpoint))
                tmp.rename(self.branches_dir / sbx.branch_id)
        except BaseException:
            self._remove_branch_tree(tmp)
            raise
        return sbx

    def adopt_sandbox(self, name: str, image: str, spec: dict, from_checkpoint: str,
                      branch_id: str, lower: tuple[str, ...], init_pid: int,
                      init_start: float) -> SandboxRecord:
        """Record a running sandbox on a prepared branch (a warm fork child), in one
        transaction: its dirs exist already and its processes are started."""
        sbx = SandboxRecord(id=new_id("sbx"), name=name, image=image, state="running",
                            branch_id=branch_id, created_at=time.time(), spec=spec,
                            init_pid=init_pid, init_start=init_start, head=from_checkpoint)
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM checkpoints WHERE id=?",
                              (from_checkpoint,)).fetchone():
                raise CheckpointNotFound(f"checkpoint {from_checkpoint} was deleted")
            db.execute("INSERT INTO branches VALUES (?,?,?)",
                       (branch_id, json.dumps(list(lower)), sbx.created_at))
            db.execute("INSERT INTO sandboxes (id,name,image,state,branch_id,created_at,spec,"
                       "init_pid,init_start,head) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (sbx.id, name, image, "running", branch_id, sbx.created_at,
                        json.dumps(spec), init_pid, init_start, from_checkpoint))
        return sbx

    def set_sandbox_state(self, sandbox_id: str, state: str, init_pid: int = 0,
                          init_start: float = 0.0) -> None:
        with self.transaction() as db:
            db.execute("UPDATE sandboxes SET state=?, init_pid=?, init_start=? WHERE id=?",
                       (state, init_pid, init_start, sandbox_id))

    def delete_sandbox(self, sandbox_id: str) -> None:
        """Forget a sandbox and its branch; then delete the branch's directories."""
        with self.transaction() as db:
            row = db.execute("SELECT branch_id FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is None:
                return
            db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))
            lower = db.execute("SELECT lower FROM branches WHERE id=?", (row[0],)).fetchone()
            db.execute("DELETE FROM branches WHERE id=?", (row[0],))
            if lower:
                # Image layers stay while their image exists; this matters for the
                # checkpoint layers of later issues.
                self._drop_unused_layers(db, json.loads(lower[0]))
        self._remove_branch_tree(self.branches_dir / row[0])
        (self.mnt_dir / row[0]).rmdir() if (self.mnt_dir / row[0]).exists() else None
        self.delete_unreferenced_layer_dirs()

    def get_sandbox(self, ref: str) -> SandboxRecord:
        rows = self._query("SELECT * FROM sandboxes WHERE id=? OR name=?", (ref, ref))
        if not rows:
            raise SandboxNotFound(f"no sandbox {ref!r}")
        return _sandbox(rows[0])

    def list_sandboxes(self) -> list[SandboxRecord]:
        return [_sandbox(r) for r in self._query("SELECT * FROM sandboxes ORDER BY created_at")]

    def get_branch(self, branch_id: str) -> BranchRecord:
        rows = self._query("SELECT * FROM branches WHERE id=?", (branch_id,))
        if not rows:
            raise NotFound(f"no branch {branch_id!r}")
        r = rows[0]
        return BranchRecord(r[0], tuple(json.loads(r[1])), r[2])

    def branch_mount(self, branch_id: str) -> Mount:
        """The overlay mount of a recorded branch, as data."""
        return self.branch_mount_for(branch_id, self.get_branch(branch_id).lower)

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

    # ---- checkpoints -----------------------------------------------------------------

    def images_path(self, checkpoint_id: str) -> Path:
        return self.images_dir / checkpoint_id

    def commit_checkpoint(self, sandbox: SandboxRecord, label: str, mode: str,
                          base_layers: tuple[str, ...], base_mount: tuple[str, ...],
                          new_layer_dir: Path | None, stats: dict,
                          images: Path | None = None) -> CheckpointRecord:
        """Record a checkpoint (and its new layer, if anything changed) in one
        transaction, and make it the sandbox's head.

        `base_layers` is the branch's chain as sunk so far, `base_mount` an equal
        chain to mount (shorter once an ancestor was squashed)."""
        now = time.time()
        layer_id = new_id("l") if new_layer_dir is not None else None
        new = (layer_id,) if layer_id else ()
        layers, mount = base_layers + new, base_mount + new
        ckpt = CheckpointRecord(new_id("ck"), sandbox.id, sandbox.head, label, mode, now,
                                tuple(layers), tuple(mount), "", False, stats, sandbox.image,
                                sandbox.spec)
        size = int(stats.get("cloned_bytes", 0))  # shared with the upper via reflinks
        if self.durable and new_layer_dir is not None:
            _syncfs(new_layer_dir)
        moved = False
        try:
            with self.transaction() as db:
                row = db.execute("SELECT branch_id, head FROM sandboxes WHERE id=?",
                                 (sandbox.id,)).fetchone()
                if row is None or tuple(row) != (sandbox.branch_id, sandbox.head):
                    raise FailedPrecondition(f"sandbox {sandbox.name} changed during the "
                                             "checkpoint")
                if layer_id:
                    db.execute("INSERT INTO layers VALUES (?,?,?,?)",
                               (layer_id, now, size, f"checkpoint:{ckpt.id}"))
                    new_layer_dir.rename(self.layer_path(layer_id))
                    moved = True
                db.execute("INSERT INTO checkpoints (id,sandbox_id,parent_id,label,mode,created_at,"
                           "layers,mount,stats,image,spec) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                           (ckpt.id, ckpt.sandbox_id, ckpt.parent_id, label, mode, now,
                            json.dumps(list(layers)), json.dumps(list(mount)),
                            json.dumps(stats), sandbox.image, json.dumps(sandbox.spec)))
                db.execute("UPDATE sandboxes SET head=? WHERE id=?", (ckpt.id, sandbox.id))
                if images is not None:
                    images.rename(self.images_path(ckpt.id))
                crash_point("checkpoint.commit")
        except BaseException:
            if moved:
                self.layer_path(layer_id).rename(new_layer_dir)
            raise
        sandbox.head = ckpt.id
        return ckpt

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise InvalidArgument("a checkpoint id is required")
        rows = self._query(f"SELECT {_CKPT_COLS} FROM checkpoints WHERE id=?", (checkpoint_id,))
        if not rows:
            raise CheckpointNotFound(f"no checkpoint {checkpoint_id!r}")
        return _checkpoint(rows[0])

    def checkpoint_tree(self, sandbox: SandboxRecord) -> list[CheckpointRecord]:
        """The sandbox's checkpoints plus their ancestors (forks start in another
        sandbox's tree), oldest first."""
        found = {r[0]: _checkpoint(r) for r in self._query(
            f"SELECT {_CKPT_COLS} FROM checkpoints WHERE sandbox_id=?", (sandbox.id,))}
        todo = [c.parent_id for c in found.values()] + [sandbox.head]
        while todo:
            cid = todo.pop()
            if cid and cid not in found:
                rows = self._query(f"SELECT {_CKPT_COLS} FROM checkpoints WHERE id=?", (cid,))
                if rows:
                    found[cid] = _checkpoint(rows[0])
                    todo.append(found[cid].parent_id)
        return sorted(found.values(), key=lambda c: c.created_at)

    def tree_root(self, checkpoint_id: str) -> str:
        cid = checkpoint_id
        while True:
            rows = self._query("SELECT parent_id FROM checkpoints WHERE id=?", (cid,))
            if not rows or not rows[0][0]:
                return cid
            cid = rows[0][0]

    def switch_branch(self, sandbox: SandboxRecord, new_branch_id: str,
                      lower: tuple[str, ...], head: str, init_pid: int,
                      init_start: float) -> str:
        """Point the sandbox at a new running branch over `lower` (rollback), in one
        transaction; returns the old branch id, whose row is gone and whose
        directories the caller deletes."""
        old = sandbox.branch_id
        with self.transaction() as db:
            if head and not db.execute("SELECT 1 FROM checkpoints WHERE id=?",
                                       (head,)).fetchone():
                raise CheckpointNotFound(f"checkpoint {head} was deleted")
            db.execute("INSERT INTO branches VALUES (?,?,?)",
                       (new_branch_id, json.dumps(list(lower)), time.time()))
            db.execute("UPDATE sandboxes SET branch_id=?, head=?, state='running', init_pid=?, "
                       "init_start=? WHERE id=?",
                       (new_branch_id, head, init_pid, init_start, sandbox.id))
            db.execute("DELETE FROM branches WHERE id=?", (old,))
        sandbox.branch_id, sandbox.head = new_branch_id, head
        sandbox.state, sandbox.init_pid, sandbox.init_start = "running", init_pid, init_start
        return old

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
            _rmtree(path)

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

    def update_stats(self, checkpoint_id: str, extra: dict) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT stats FROM checkpoints WHERE id=?", (checkpoint_id,)).fetchone()
            if row is not None:
                db.execute("UPDATE checkpoints SET stats=? WHERE id=?",
                           (json.dumps({**json.loads(row[0]), **extra}), checkpoint_id))

    def set_unusable(self, checkpoint_id: str, reason: str, criu_build: str = "") -> None:
        """Record that the checkpoint's processes cannot be restored (by `criu_build`),
        or with reason "" that they can. A deleted checkpoint is left alone."""
        with self.transaction() as db:
            db.execute("UPDATE checkpoints SET unusable=?, unusable_criu=? WHERE id=?",
                       (reason, criu_build if reason else "", checkpoint_id))

    def set_pinned(self, checkpoint_id: str, pinned: bool) -> CheckpointRecord:
        with self.transaction() as db:
            if db.execute("UPDATE checkpoints SET pinned=? WHERE id=?",
                          (int(pinned), checkpoint_id)).rowcount == 0:
                raise CheckpointNotFound(f"no checkpoint {checkpoint_id!r}")
        return self.get_checkpoint(checkpoint_id)

    def delete_checkpoint(self, checkpoint_id: str, cascade: bool = False,
                          in_use=None, remove_files: bool = True) -> list[str]:
        """Delete a checkpoint (and with cascade its descendants); free unused layers.
        Returns the deleted ids.

        `in_use(ids)` names those of the doomed ids that operations in flight build
        on; it is asked inside the transaction (so an operation that starts after it
        finds the checkpoint gone), and any answer raises `CheckpointInUse`. With
        `remove_files` False the caller removes the files later
        (`remove_checkpoint_files`), once nothing is mounted over them."""
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM checkpoints WHERE id=?", (checkpoint_id,)).fetchone():
                raise CheckpointNotFound(f"no checkpoint {checkpoint_id!r}")
            doomed, todo = [], [checkpoint_id]
            while todo:
                cid = todo.pop()
                doomed.append(cid)
                children = [r[0] for r in db.execute(
                    "SELECT id FROM checkpoints WHERE parent_id=?", (cid,))]
                if children and not cascade:
                    raise FailedPrecondition(f"checkpoint {cid} has children "
                                             f"({', '.join(children)}); use cascade")
                todo.extend(children)
            marks = ",".join("?" * len(doomed))
            pinned = [r[0] for r in db.execute(
                f"SELECT id FROM checkpoints WHERE pinned=1 AND id IN ({marks})", doomed)]
            if pinned:
                raise FailedPrecondition(f"checkpoint(s) {', '.join(pinned)} are pinned")
            heads = [r[0] for r in db.execute(
                f"SELECT name FROM sandboxes WHERE head IN ({marks})", doomed)]
            if heads:
                raise FailedPrecondition(f"sandbox(es) {', '.join(heads)} run on top of it; "
                                         "roll them back elsewhere or destroy them first")
            busy = in_use(doomed) if in_use is not None else []
            if busy:
                raise CheckpointInUse(busy)
            layers: set[str] = set()
            for (ids, mount, squashed) in db.execute(
                    f"SELECT layers, mount, squashed FROM checkpoints WHERE id IN ({marks})",
                    doomed):
                layers.update(json.loads(ids) + json.loads(mount))
                if squashed:
                    layers.add(squashed)
            db.execute(f"DELETE FROM checkpoints WHERE id IN ({marks})", doomed)
            self._drop_unused_layers(db, sorted(layers))
        if remove_files:
            self.remove_checkpoint_files(doomed)
        return doomed

    def remove_checkpoint_files(self, checkpoint_ids: list[str]) -> None:
        """After `delete_checkpoint`: the layers no row refers to, and the images."""
        self.delete_unreferenced_layer_dirs()
        for cid in checkpoint_ids:
            _rmtree(self.images_path(cid))

    def checkpoint_exists(self, checkpoint_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM checkpoints WHERE id=?", (checkpoint_id,)))

    def set_squashed(self, checkpoint_id: str, base: tuple[str, ...], layer_dir: Path,
                     expect_mount: tuple[str, ...]) -> str | None:
        """Make `base` + [layer_dir] the checkpoint's mount chain (equal to its
        current one, `expect_mount`, which is checked: no race with another squash)."""
        layer_id = new_id("l")
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT mount FROM checkpoints WHERE id=? AND squashed=''",
                             (checkpoint_id,)).fetchone()
            if row is None or tuple(json.loads(row[0])) != expect_mount:
                return None
            db.execute("INSERT INTO layers VALUES (?,?,?,?)",
                       (layer_id, now, _tree_size(layer_dir), f"squash:{checkpoint_id}"))
            layer_dir.rename(self.layer_path(layer_id))
            db.execute("UPDATE checkpoints SET squashed=?, mount=? WHERE id=?",
                       (layer_id, json.dumps(list(base) + [layer_id]), checkpoint_id))
            crash_point("squash.commit")
        return layer_id

    def rebase_on_squashed(self, checkpoint_id: str) -> int:
        """Checkpoints that extend a squashed one's chain (taken while it was being
        squashed) mount its squashed chain plus their own newer layers instead --
        a metadata change, no data is copied. Returns how many were rebased."""
        done = 0
        with self.transaction() as db:
            row = db.execute("SELECT layers, mount FROM checkpoints WHERE id=? AND squashed!=''",
                             (checkpoint_id,)).fetchone()
            if row is None:
                return 0
            base_layers, base_mount = json.loads(row[0]), json.loads(row[1])
            for cid, layers, mount in db.execute(
                    "SELECT id, layers, mount FROM checkpoints WHERE squashed='' AND id!=?",
                    (checkpoint_id,)).fetchall():
                layers, mount = json.loads(layers), json.loads(mount)
                if layers[:len(base_layers)] != base_layers:
                    continue
                rebased = base_mount + layers[len(base_layers):]
                if len(rebased) < len(mount):
                    db.execute("UPDATE checkpoints SET mount=? WHERE id=?",
                               (json.dumps(rebased), cid))
                    done += 1
        return done

    def gc_layers(self) -> None:
        """Drop layer rows nothing refers to any more, then their directories."""
        with self.transaction() as db:
            all_ids = [r[0] for r in db.execute("SELECT id FROM layers")]
            self._drop_unused_layers(db, all_ids)
        self.delete_unreferenced_layer_dirs()

    # ---- reconciliation --------------------------------------------------------------

    def reconcile_disk(self) -> dict[str, int]:
        """Delete directories the database does not know; return what was removed."""
        removed = {"tmp": 0, "layers": 0, "branches": 0, "mnt": 0}
        for d in self.tmp_dir.iterdir():
            self._remove_branch_tree(d)
            removed["tmp"] += 1
        known_layers = {r[0] for r in self._query("SELECT id FROM layers")}
        for d in self.layers_dir.iterdir():
            if d.name not in known_layers:
                _rmtree(d)
                removed["layers"] += 1
        known_branches = {r[0] for r in self._query("SELECT id FROM branches")}
        for d in self.branches_dir.iterdir():
            if d.name not in known_branches:
                self._remove_branch_tree(d)
                removed["branches"] += 1
        for d in self.mnt_dir.iterdir():
            if d.name not in known_branches and not linux.is_mountpoint(d):
                d.rmdir()
                removed["mnt"] += 1
        known_checkpoints = {r[0] for r in self._query("SELECT id FROM checkpoints")}
        removed["images"] = 0
        for d in self.images_dir.iterdir():
            if d.name not in known_checkpoints:
                _rmtree(d)
                removed["images"] += 1
        removed["unlimited_branches"] = self.apply_disk_limits()
        return removed

    def apply_disk_limits(self) -> int:
        """Set every sandbox branch's limit from its spec (the store may have been
        mounted without prjquota before); returns how many limited sandboxes run
        on a branch without a project (made before disk limits: unlimited until
        their next rollback)."""
        untagged = 0
        for sbx in self.list_sandboxes():
            limit = DiskLimit.of(sbx.spec)
            if not self.quotas.apply(self.branches_dir / sbx.branch_id, limit) \
                    and (limit.bytes or limit.inodes) and self.quotas.tagging:
                untagged += 1
                log.warning("store.branch_without_project", sandbox=sbx.name,
                            branch=sbx.branch_id)
        return untagged


def _image(r: tuple) -> ImageRecord:
    return ImageRecord(r[0], tuple(json.loads(r[1])), r[2], r[3], r[4], r[5])


def _sandbox(r: tuple) -> SandboxRecord:
    return SandboxRecord(id=r[0], name=r[1], image=r[2], state=r[3], branch_id=r[4],
                         created_at=r[5], spec=json.loads(r[6]), init_pid=r[7], init_start=r[8],
                         head=r[9])


# Named, not `*`: columns added later (ALTER TABLE) sit in whatever order the store
# acquired them.
_CKPT_COLS = ("id, sandbox_id, parent_id, label, mode, created_at, layers, mount, squashed, "
              "pinned, stats, image, spec, unusable, unusable_criu")


def _checkpoint(r: tuple) -> CheckpointRecord:
    return CheckpointRecord(id=r[0], sandbox_id=r[1], parent_id=r[2], label=r[3], mode=r[4],
                            created_at=r[5], layers=tuple(json.loads(r[6])),
                            mount=tuple(json.loads(r[7])), squashed=r[8], pinned=bool(r[9]),
                            stats=json.loads(r[10]), image=r[11], spec=json.loads(r[12]),
                            unusable_reason=r[13], unusable_criu=r[14])


def _syncfs(path: Path) -> None:
    """Flush the store's filesystem (durable mode: layers survive power loss)."""
    import ctypes
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def _tree_size(path: Path) -> int:
    """Bytes allocated to the files of a layer (its contents are a sandbox's: walked
    fd-relative, following no symlink)."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return sum(st.st_blocks * 512 for _, st, _, _ in deltafs.walk_tree(fd)
                   if not stat.S_ISDIR(st.st_mode))
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
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
            deltafs.remove_tree_contents(fd)
        finally:
            os.close(fd)
        os.rmdir(path.name, dir_fd=parent)
    finally:
        os.close(parent)
