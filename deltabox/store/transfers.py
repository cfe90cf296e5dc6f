"""The transfer half of `Store`: layer content digests, and committing an imported
checkpoint (its new layers, its images and its row) in one transaction.

A layer's digest is the sha256 of its transfer records (`deltabox.core.transfer_format`):
two daemons holding the same layer content agree on it, so a sender skips what the
receiver has (`HaveLayers`). It is computed at a layer's first export, off the checkpoint's
hot path, and cached in `layer_digests`; an imported layer's digest is recorded as it
arrives (it was checked against the stream). Rows of freed layers are swept at start-up
(`sweep_layer_digests`, from `deltabox.core.reconcile`) and never answered before that
(every read joins `layers`).

An import commits like a checkpoint: the new layer dirs (built under tmp/) are renamed into
layers/ and the images into images/ inside the transaction; a failure renames them back for
the caller to delete, and a crash leaves them in tmp/, which start-up wipes.

`TransferTable` is mixed into `Store` (as `CheckpointTable` is) and uses its connection.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from deltabox.errors import FailedPrecondition
from deltabox.faults import crash_point
from deltabox.store.layout import syncfs
from deltabox.store.records import CheckpointRecord, new_id

__all__ = ["TransferTable", "ImportedLayer"]


@dataclass
class ImportedLayer:
    digest: str
    size: int
    path: Path | None   # a finished dir under tmp/, or None: held here already


class TransferTable:
    """Layer digests and imported checkpoints (mixed into `Store`)."""

    def layer_digests(self, layer_ids) -> dict[str, tuple[str, int]]:
        """layer id -> (digest, size) for the ones known."""
        ids = list(layer_ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return {r[0]: (r[1], r[2]) for r in self._query(
            f"SELECT layer_id, digest, size_bytes FROM layer_digests WHERE layer_id IN ({marks})",
            tuple(ids))}

    def record_layer_digest(self, layer_id: str, digest: str, size: int) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM layers WHERE id=?", (layer_id,)).fetchone():
                db.execute("INSERT OR REPLACE INTO layer_digests VALUES (?,?,?)",
                           (layer_id, digest, size))

    def layers_by_digest(self, digests) -> dict[str, str]:
        """digest -> a layer id holding it, for the digests this store has."""
        ds = list(dict.fromkeys(digests))
        if not ds:
            return {}
        marks = ",".join("?" * len(ds))
        return {r[0]: r[1] for r in self._query(
            f"SELECT d.digest, d.layer_id FROM layer_digests d JOIN layers l ON l.id = d.layer_id "
            f"WHERE d.digest IN ({marks})", tuple(ds))}

    def sweep_layer_digests(self) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM layer_digests WHERE layer_id NOT IN "
                              "(SELECT id FROM layers)").rowcount

    def commit_imported_checkpoint(self, ckpt: CheckpointRecord, chain: list[ImportedLayer],
                                   images: Path | None) -> CheckpointRecord:
        """Record an imported checkpoint over `chain` (bottom first) in one transaction:
        new layers renamed into place (a digest held here meanwhile reuses that layer),
        its images, its row. `ckpt.layers`/`mount` are ignored (the chain's ids are
        used); its parent is kept only if held here. Importing one that exists returns
        the existing one (and moves nothing)."""
        now = time.time()
        if self.durable:
            for layer in chain:
                if layer.path is not None:
                    syncfs(layer.path)
        moved: list[tuple[Path, Path]] = []
        try:
            with self.transaction() as db:
                if not db.execute("SELECT 1 FROM checkpoints WHERE id=?",
                                  (ckpt.id,)).fetchone():
                    ids = self._import_chain(db, ckpt.id, chain, now, moved)
                    parent = ckpt.parent_id if ckpt.parent_id and db.execute(
                        "SELECT 1 FROM checkpoints WHERE id=?", (ckpt.parent_id,)).fetchone() \
                        else ""
                    # The sandbox it was taken of lives in the source daemon: a stream
                    # naming one of ours must not put the checkpoint in that one's tree.
                    sandbox = "" if db.execute("SELECT 1 FROM sandboxes WHERE id=?",
                                               (ckpt.sandbox_id,)).fetchone() \
                        else ckpt.sandbox_id
                    db.execute(
                        "INSERT INTO checkpoints (id,sandbox_id,parent_id,label,mode,created_at,"
                        "layers,mount,stats,image,spec) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (ckpt.id, sandbox, parent, ckpt.label, ckpt.mode,
                         ckpt.created_at, json.dumps(ids), json.dumps(ids),
                         json.dumps(ckpt.stats), ckpt.image, json.dumps(ckpt.spec)))
                    if images is not None:
                        images.rename(self.images_path(ckpt.id))
                        moved.append((self.images_path(ckpt.id), images))
                    crash_point("transfer.commit")
        except BaseException:
            for dst, src in moved:  # the rows are gone: back to tmp/ for the caller
                dst.rename(src)
            raise
        return self.get_checkpoint(ckpt.id)

    def _import_chain(self, db, checkpoint_id: str, chain: list[ImportedLayer], now: float,
                      moved: list) -> list[str]:
        ids = []
        for layer in chain:
            row = db.execute("SELECT d.layer_id FROM layer_digests d JOIN layers l "
                             "ON l.id = d.layer_id WHERE d.digest=? LIMIT 1",
                             (layer.digest,)).fetchone()
            if row is not None:
                ids.append(row[0])   # held here (maybe since the stream started)
                continue
            if layer.path is None:
                raise FailedPrecondition(f"layer {layer.digest} was not sent and is not held "
                                         "here (deleted meanwhile?); send it again")
            lid = new_id("l")
            db.execute("INSERT INTO layers VALUES (?,?,?,?)",
                       (lid, now, layer.size, f"import:{checkpoint_id}"))
            db.execute("INSERT INTO layer_digests VALUES (?,?,?)", (lid, layer.digest, layer.size))
            layer.path.rename(self.layer_path(lid))
            moved.append((self.layer_path(lid), layer.path))
            ids.append(lid)
        return ids
