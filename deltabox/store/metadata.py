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

Where things are
----------------
- `deltabox.store.records`: the records (`ImageRecord`, `SandboxRecord`, ...), `Mount`,
  ids and names, and the SQLite schema.
- `deltabox.store.layout`: the directories under the store root (layers/, branches/,
  mnt/, images/, tmp/) and `remove_tree`; `Store` builds on its `Layout`.
- `deltabox.store.checkpoints`: the checkpoint records (a part of `Store`).
- `deltabox.store.backing`: the XFS filesystem the store lives on.
- here: `Store`, the database -- transactions, images, sandboxes, branches, layer
  reference counting and reconciliation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import structlog

from deltabox.host import linux
from deltabox.host.quota import DiskLimit
from deltabox.errors import (AlreadyExists, CheckpointNotFound, FailedPrecondition, ImageNotFound,
                             NotFound, SandboxNotFound)
from deltabox.faults import crash_point
from deltabox.store.checkpoints import CheckpointTable
from deltabox.store.transfers import TransferTable
from deltabox.store.layout import Layout, remove_tree, tree_size
from deltabox.store.records import (SCHEMA, SCHEMA_VERSION, BranchRecord, ImageRecord, Mount,
                                    SandboxRecord, image_from_row, new_id, sandbox_from_row)

__all__ = ["Store", "read_instance_id"]

log = structlog.get_logger("deltabox.store.metadata")


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


# The layers something refers to: images, branches, checkpoints' mount chains and
# squashed layers -- and a live branch's own checkpoint layers, which name the paths its
# next sink must whiteout after a restart (see SandboxManager._recover_manifest).
_USED_LAYERS = ("SELECT j.value FROM images, json_each(images.layer_ids) j "
                "UNION SELECT j.value FROM branches, json_each(branches.lower) j "
                "UNION SELECT j.value FROM checkpoints, json_each(checkpoints.mount) j "
                "UNION SELECT squashed FROM checkpoints WHERE squashed != '' "
                "UNION SELECT j.value FROM checkpoints c JOIN sandboxes s ON s.head = c.id, "
                "json_each(c.layers) j")
_USED_LAYERS_SQL = f"SELECT value FROM ({_USED_LAYERS}) WHERE value IS NOT NULL"


class Store(CheckpointTable, TransferTable, Layout):
    """The store: its directories (`Layout`), and the SQLite database that is the truth
    about them. Every state transition is one transaction (`transaction`)."""

    def __init__(self, root: Path, durable: bool = False):
        super().__init__(root)
        self.durable = durable
        # One connection for transactions, serialised by a lock: callers run in a thread
        # pool. Plain reads (`_read`) use a connection of their own thread instead.
        self._lock = threading.RLock()
        self._depth = 0  # how many times its owner holds it (only the owner touches it)
        self._urgent: collections.deque = collections.deque()  # see switch_soon
        self._gc_lock = threading.Lock()  # see delete_unreferenced_layer_dirs
        self._readers: list[sqlite3.Connection] = []
        self._reader = threading.local()
        self._db = sqlite3.connect(root / "meta.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a crash of the daemon (the promise we
        # make); FULL (durable=True) also fsyncs each commit against power loss.
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            self._db.executescript(SCHEMA)
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
        with self._locked():
            self._db.close()
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One state transition: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error."""
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """A read that waits for a transaction in flight and sees its outcome (what
        `delete_unreferenced_layer_dirs` relies on)."""
        with self._locked():
            return self._db.execute(sql, args).fetchall()

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        """A read that never waits for the store's lock: on a connection of the calling
        thread, it sees the last committed state (WAL readers do not block on the
        writer). The event loop reads records on every call (GetSandbox, exec, rollback);
        waiting there for a worker thread's transaction (a checkpoint's commit, a
        squash, GC) stalled every call of the daemon (issue 10, target 1). Inside this
        thread's own transaction it reads through that transaction (its writes)."""
        if self._lock._is_owned():
            return self._query(sql, args)
        conn = getattr(self._reader, "db", None)
        if conn is None:
            conn = sqlite3.connect(self.root / "meta.db", check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
            with self._locked():
                self._readers.append(conn)
            self._reader.db = conn
        return conn.execute(sql, args).fetchall()

    @contextmanager
    def lock_if_free(self) -> Iterator[bool]:
        """The store's lock, held for the block if it was free (True), else not taken
        (False): for the event loop, which must not wait for a worker's transaction
        (it hops to a thread instead). Transactions inside the block re-enter it."""
        got = self._take(blocking=False)
        try:
            yield got
        finally:
            if got:
                self._release()

    def switch_soon(self, fn, *args) -> concurrent.futures.Future:
        """For the event loop: `fn(*args)` (one transaction: a hot rollback's switch)
        run with the store's lock held, and never waited for -- now if the lock is free,
        else by the thread that holds it, as it lets it go, before any other thread
        waiting for it gets it. Its future is done when `fn` has returned (committed).

        A worker's transaction holding the lock made the loop hand the switch to a
        thread of the shared pool, which then queued for the lock among the workers:
        115 ms p50 under 32 busy sandboxes, vs 10 on the loop (issue 10, target 1)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._urgent.append((fut, fn, args))
        if self._take(blocking=False):
            self._release()  # runs it
        return fut

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's lock, released through `_release` (every holder: switches
        queued by `switch_soon` meanwhile run before it is let go)."""
        self._take()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Let the store's lock go; the outermost holder first runs the switches
        queued by `switch_soon` (still holding it: ahead of every thread waiting for
        it), then looks again once it is released (one queued after it looked, while
        the lock was still held, would wait for the next holder)."""
        if self._urgent and self._depth == 1:
            self._run_urgent()
        self._let_go()
        while self._urgent and not self._lock._is_owned() and self._take(blocking=False):
            try:
                self._run_urgent()
            finally:
                self._let_go()

    def _take(self, blocking: bool = True) -> bool:
        """Acquire the store's lock, counting how deep its owner holds it (`_release`
        runs queued switches only at the outermost level). Our own count: the C RLock's
        `_recursion_count` is missing from some 3.11 releases (Debian 12's 3.11.2)."""
        if not self._lock.acquire(blocking):
            return False
        self._depth += 1
        return True

    def _let_go(self) -> None:
        self._depth -= 1
        self._lock.release()

    def _run_urgent(self) -> None:
        while True:
            try:
                fut, fn, args = self._urgent.popleft()
            except IndexError:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - the caller's to raise
                fut.set_exception(e)
            else:
                fut.set_result(result)

    # ---- layers & images -------------------------------------------------------------

    def commit_image(self, name: str, layer_dirs: list[Path], source: str,
                     source_format: str, replace: bool = False) -> ImageRecord:
        """Turn finished tmp dirs into layers and record the image, in one transaction."""
        now = time.time()
        layer_ids = [new_id("l") for _ in layer_dirs]
        sizes = [tree_size(d) for d in layer_dirs]
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

    def _drop_unused_layers(self, db: sqlite3.Connection, candidates) -> None:
        """Delete the rows of those of `candidates` nothing refers to (`_USED_LAYERS`).
        Worked out by SQLite, which lets the GIL go: parsing every checkpoint's chain
        in Python held the store's lock 70 ms p50 / 210 p95 (a GC among 32 busy
        sandboxes' thousands of checkpoints), while a hot rollback waited for it."""
        candidates = list(candidates)
        if candidates:
            db.execute("DELETE FROM layers WHERE id IN (SELECT value FROM json_each(?)) "
                       f"AND id NOT IN ({_USED_LAYERS_SQL})", (json.dumps(candidates),))

    def delete_unreferenced_layer_dirs(self) -> None:
        """Delete layer directories without a row (after a commit dropped them).

        Listed before the rows are read: a layer is renamed in inside the transaction
        that records it, so one listed is known once that transaction is over (rows read
        first, a layer committed meanwhile looked unknown and was deleted under its
        checkpoint)."""
        with self._gc_lock:  # two at once would race to delete the same tree
            # Names, not Path objects: thousands of layers after a busy hour, and this
            # runs after every squash (os.listdir is C; iterdir made a Path per entry).
            present = os.listdir(self.layers_dir)
            known = {r[0] for r in self._query("SELECT id FROM layers")}
            for name in present:
                if name not in known:
                    remove_tree(self.layers_dir / name)

    def get_image(self, name: str) -> ImageRecord:
        rows = self._read("SELECT * FROM images WHERE name=?", (name,))
        if not rows:
            raise ImageNotFound(f"no image named {name!r}")
        return image_from_row(rows[0])

    def list_images(self) -> list[ImageRecord]:
        return [image_from_row(r) for r in self._read("SELECT * FROM images ORDER BY name")]

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
        # An id first: a name never has an id's form (validate_name), but a record
        # from before that rule might.
        rows = self._read("SELECT * FROM sandboxes WHERE id=? OR name=? ORDER BY id=? DESC",
                          (ref, ref, ref))
        if not rows:
            raise SandboxNotFound(f"no sandbox {ref!r}")
        return sandbox_from_row(rows[0])

    def list_sandboxes(self) -> list[SandboxRecord]:
        return [sandbox_from_row(r)
                for r in self._read("SELECT * FROM sandboxes ORDER BY created_at")]

    def get_branch(self, branch_id: str) -> BranchRecord:
        rows = self._read("SELECT * FROM branches WHERE id=?", (branch_id,))
        if not rows:
            raise NotFound(f"no branch {branch_id!r}")
        r = rows[0]
        return BranchRecord(r[0], tuple(json.loads(r[1])), r[2])

    def branch_mount(self, branch_id: str) -> Mount:
        """The overlay mount of a recorded branch, as data."""
        return self.branch_mount_for(branch_id, self.get_branch(branch_id).lower)

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

    def gc_layers(self) -> None:
        """Drop layer rows nothing refers to any more, then their directories."""
        with self.transaction() as db:
            db.execute(f"DELETE FROM layers WHERE id NOT IN ({_USED_LAYERS_SQL})")
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
                remove_tree(d)
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
                remove_tree(d)
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
