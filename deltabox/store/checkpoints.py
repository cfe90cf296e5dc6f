"""The checkpoint half of `Store`: committing, reading, pinning, marking, deleting and
squashing checkpoint records, each state transition in one transaction.

A checkpoint is an immutable node of a sandbox's snapshot tree (see the vocabulary in
`deltabox.store.metadata`): its layer chain never changes, only what is known about it
(stats, pinned, unusable) and, once squashed, the equal but shorter chain it mounts.

`CheckpointTable` is a part of `Store`, not a store of its own: it is mixed into `Store`
and uses its connection (`transaction`, `_query`; plain reads `_read`), its layer bookkeeping
(`_drop_unused_layers`, `delete_unreferenced_layer_dirs`) and its directories
(`deltabox.store.layout.Layout`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from deltabox.errors import CheckpointNotFound, FailedPrecondition, InvalidArgument
from deltabox.faults import crash_point, hold_point
from deltabox.store.layout import remove_tree, syncfs, tree_size
from deltabox.store.records import (CHECKPOINT_COLUMNS, CheckpointRecord, SandboxRecord,
                                    checkpoint_from_row, new_id)

__all__ = ["CheckpointTable", "CheckpointInUse"]


class CheckpointInUse(FailedPrecondition):
    """A deletion found checkpoints that operations in flight build on (see
    `Store.delete_checkpoint`); nothing was deleted."""

    def __init__(self, checkpoint_ids: list[str]):
        super().__init__(f"checkpoint(s) {', '.join(checkpoint_ids)} are in use by a rollback, "
                         "fork or warm-up in flight")
        self.checkpoint_ids = checkpoint_ids


class CheckpointTable:
    """Checkpoint records (mixed into `Store`: see the module's docstring)."""

    def commit_checkpoint(self, sandbox: SandboxRecord, label: str, mode: str,
                          base_layers: tuple[str, ...], base_mount: tuple[str, ...],
                          new_layer_dir: Path | None, stats: dict,
                          images: Path | None = None,
                          planned: CheckpointRecord | None = None) -> CheckpointRecord:
        """Record a checkpoint (and its new layer, if anything changed) in one
        transaction, and make it the sandbox's head.

        `base_layers` is the branch's chain as sunk so far, `base_mount` an equal
        chain to mount (shorter once an ancestor was squashed). `planned`: the record
        `plan_checkpoint` made with the same arguments (a background checkpoint's id
        was handed out before this commit)."""
        ckpt = planned or self.plan_checkpoint(sandbox, label, mode, base_layers,
                                               base_mount, new_layer_dir, stats)
        now, layers, mount = ckpt.created_at, ckpt.layers, ckpt.mount_layers
        layer_id = layers[-1] if new_layer_dir is not None else None
        size = int(stats.get("cloned_bytes", 0))  # shared with the upper via reflinks
        if self.durable and new_layer_dir is not None:
            syncfs(new_layer_dir)
        moved = False

        def move_back() -> None:  # the layer dir goes back to the caller, to clean up
            nonlocal moved
            if moved:
                self.layer_path(layer_id).rename(new_layer_dir)
                moved = False
        try:
            with self.transaction() as db:
                # Moved back before the transaction ends: a layer dir without a row,
                # seen by another thread's `delete_unreferenced_layer_dirs`, is deleted.
                try:
                    row = db.execute("SELECT branch_id, head FROM sandboxes WHERE id=?",
                                     (sandbox.id,)).fetchone()
                    if row is None or tuple(row) != (sandbox.branch_id, sandbox.head):
                        raise FailedPrecondition(f"sandbox {sandbox.name} changed during "
                                                 "the checkpoint")
                    if layer_id:
                        db.execute("INSERT INTO layers VALUES (?,?,?,?)",
                                   (layer_id, now, size, f"checkpoint:{ckpt.id}"))
                        new_layer_dir.rename(self.layer_path(layer_id))
                        moved = True
                    db.execute("INSERT INTO checkpoints (id,sandbox_id,parent_id,label,mode,"
                               "created_at,layers,mount,stats,image,spec) "
                               "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                               (ckpt.id, ckpt.sandbox_id, ckpt.parent_id, label, mode, now,
                                json.dumps(list(layers)), json.dumps(list(mount)),
                                json.dumps(stats), sandbox.image, json.dumps(sandbox.spec)))
                    db.execute("UPDATE sandboxes SET head=? WHERE id=?", (ckpt.id, sandbox.id))
                    if images is not None:
                        images.rename(self.images_path(ckpt.id))
                    crash_point("checkpoint.commit")
                    hold_point("checkpoint.commit")  # a test's window: the lock held
                except BaseException:
                    move_back()
                    raise
        except BaseException:
            move_back()  # the COMMIT itself failed
            raise
        sandbox.head = ckpt.id
        return ckpt

    def plan_checkpoint(self, sandbox: SandboxRecord, label: str, mode: str,
                        base_layers: tuple[str, ...], base_mount: tuple[str, ...],
                        new_layer_dir: Path | None, stats: dict) -> CheckpointRecord:
        """The record `commit_checkpoint` will write (ids chosen, nothing stored)."""
        new = (new_id("l"),) if new_layer_dir is not None else ()
        return CheckpointRecord(new_id("ck"), sandbox.id, sandbox.head, label, mode,
                                time.time(), tuple(base_layers + new),
                                tuple(base_mount + new), "", False, stats, sandbox.image,
                                sandbox.spec)

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise InvalidArgument("a checkpoint id is required")
        rows = self._read(f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id=?",
                           (checkpoint_id,))
        if not rows:
            raise CheckpointNotFound(f"no checkpoint {checkpoint_id!r}")
        return checkpoint_from_row(rows[0])

    def checkpoint_tree(self, sandbox: SandboxRecord) -> list[CheckpointRecord]:
        """The sandbox's checkpoints plus their ancestors (forks start in another
        sandbox's tree), oldest first."""
        found = {r[0]: checkpoint_from_row(r) for r in self._read(
            f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE sandbox_id=?", (sandbox.id,))}
        todo = [c.parent_id for c in found.values()] + [sandbox.head]
        while todo:
            cid = todo.pop()
            if cid and cid not in found:
                rows = self._read(f"SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id=?",
                                   (cid,))
                if rows:
                    found[cid] = checkpoint_from_row(rows[0])
                    todo.append(found[cid].parent_id)
        return sorted(found.values(), key=lambda c: c.created_at)

    def tree_root(self, checkpoint_id: str) -> str:
        cid = checkpoint_id
        while True:
            rows = self._read("SELECT parent_id FROM checkpoints WHERE id=?", (cid,))
            if not rows or not rows[0][0]:
                return cid
            cid = rows[0][0]

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
            remove_tree(self.images_path(cid))

    def checkpoint_exists(self, checkpoint_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM checkpoints WHERE id=?", (checkpoint_id,)))

    def set_squashed(self, checkpoint_id: str, base: tuple[str, ...], layer_dir: Path,
                     expect_mount: tuple[str, ...]) -> str | None:
        """Make `base` + [layer_dir] the checkpoint's mount chain (equal to its
        current one, `expect_mount`, which is checked: no race with another squash)."""
        layer_id = new_id("l")
        now = time.time()
        size = tree_size(layer_dir)  # a walk of the tree: not with the store's lock held
        with self.transaction() as db:
            row = db.execute("SELECT mount FROM checkpoints WHERE id=? AND squashed=''",
                             (checkpoint_id,)).fetchone()
            if row is None or tuple(json.loads(row[0])) != expect_mount:
                return None
            db.execute("INSERT INTO layers VALUES (?,?,?,?)",
                       (layer_id, now, size, f"squash:{checkpoint_id}"))
            layer_dir.rename(self.layer_path(layer_id))
            db.execute("UPDATE checkpoints SET squashed=?, mount=? WHERE id=?",
                       (layer_id, json.dumps(list(base) + [layer_id]), checkpoint_id))
            crash_point("squash.commit")
        return layer_id

    def rebase_on_squashed(self, checkpoint_id: str) -> list[str]:
        """Checkpoints that extend a squashed one's chain (taken while it was being
        squashed) mount its squashed chain plus their own newer layers instead --
        a metadata change, no data is copied. Returns the ids of those rebased."""
        done: list[str] = []
        with self.transaction() as db:
            row = db.execute("SELECT layers, mount FROM checkpoints WHERE id=? AND squashed!=''",
                             (checkpoint_id,)).fetchone()
            if row is None:
                return []
            base_layers, base_mount = json.loads(row[0]), json.loads(row[1])
            # Only those whose chain starts with its chain (as the JSON text is written:
            # SQLite picks them, not a parse of every checkpoint with the lock held).
            prefix = json.dumps(base_layers)[:-1]
            for cid, layers, mount in db.execute(
                    "SELECT id, layers, mount FROM checkpoints WHERE squashed='' AND id!=? "
                    "AND substr(layers, 1, ?) = ?",
                    (checkpoint_id, len(prefix), prefix)).fetchall():
                layers, mount = json.loads(layers), json.loads(mount)
                if layers[:len(base_layers)] != base_layers:
                    continue
                rebased = base_mount + layers[len(base_layers):]
                if len(rebased) < len(mount):
                    db.execute("UPDATE checkpoints SET mount=? WHERE id=?",
                               (json.dumps(rebased), cid))
                    done.append(cid)
        return done
