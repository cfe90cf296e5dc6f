"""Checkpoints that travel: export a checkpoint as a stream another daemon imports, where
Fork (and Rollback of its forks) work as if it had been taken there.

What moves: the checkpoint's mount chain (the image's layers included: the chain starts
with them), each layer as records addressed by its content digest; for a FULL checkpoint
its CRIU images; and its record (id, label, mode, spec, stats, image name). The stream's
frames, checksums and records are `deltabox.core.transfer_format`'s.

Import rules (the contract in the .proto):
- the checkpoint keeps its id; one this daemon has already is a no-op returning it;
- it lands detached (no sandbox of its own), its parent kept only if held here;
- layers this daemon holds are reused by digest, whether or not the sender skipped them;
- the host must match: stream format, store format and arch always, and for a FULL
  checkpoint the kernel release and CRIU version too (CRIU restores only on those);
  FAILED_PRECONDITION names the fact that differs;
- a corrupt, truncated or hostile stream is INVALID_ARGUMENT and leaves nothing: layers
  are built under tmp/ and committed with the row in one transaction
  (`Store.commit_imported_checkpoint`); a crash leaves tmp/, which start-up wipes;
- a FULL checkpoint (or any, with `transfer-require-signature`) must be signed with this
  daemon's transfer key (`deltabox.core.transfer_key`: its CRIU images are restored as
  host root and cannot be validated): else PERMISSION_DENIED, saying why and the fix. The
  signature is checked at the trailer, before the commit: until then what the stream
  wrote lies under tmp/ only, and is removed like any refused stream's.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import threading
from pathlib import Path
from typing import AsyncIterator, Iterator

import structlog
from prometheus_client import Counter

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.core.runtime import SandboxContext
from deltabox.core.spec import check_spec
from deltabox.core.transfer_format import (FORMAT, STORE_FORMAT, ChunkReader, ChunkWriter,
                                           Section, digest_of_tree, tree_records, write_tree)
from deltabox.core.transfer_key import refusal
from deltabox.errors import FailedPrecondition, ImageNotFound, InvalidArgument, PermissionDenied
from deltabox.faults import crash_point
from deltabox.store.layout import remove_tree
from deltabox.store.records import CheckpointRecord
from deltabox.store.transfers import ImportedLayer
from deltabox.types import CheckpointMode

__all__ = ["Transfers"]

log = structlog.get_logger("deltabox.core.transfer")

_MODE_PB = {CheckpointMode.FS: pb.CHECKPOINT_MODE_FS, CheckpointMode.FULL: pb.CHECKPOINT_MODE_FULL}
_MODE_FROM_PB = {v: k for k, v in _MODE_PB.items()}
_END = object()
MAX_DIGESTS = 4096   # per HaveLayers / skip_layers


class Transfers:
    """Manifest, layer lookup, export and import of checkpoints (one per daemon)."""

    def __init__(self, ctx: SandboxContext):
        self._ctx = ctx
        self._criu_version: str | None = None
        reg = ctx.metrics.registry
        self.bytes = Counter("deltabox_transfer_bytes_total", "Compressed checkpoint "
                             "stream bytes exported / imported", ["direction"], registry=reg)
        self.layers = Counter("deltabox_transfer_layers_total", "Layers of exported "
                              "checkpoints: sent or skipped (the receiver held them)",
                              ["outcome"], registry=reg)

    # ---- host facts -------------------------------------------------------------------

    def host_facts(self) -> dict[str, str]:
        if self._criu_version is None:
            criu = self._ctx.criu
            self._criu_version = criu.version() if criu is not None else ""
        u = os.uname()
        return {"kernel_release": u.release, "criu_version": self._criu_version,
                "arch": u.machine, "store_format": STORE_FORMAT}

    def check_compatible(self, m: pb.Manifest) -> None:
        """FAILED_PRECONDITION naming the first fact of the stream this host lacks."""
        if m.format != FORMAT:
            raise FailedPrecondition(f"the stream's format is {m.format!r}; this daemon reads "
                                     f"{FORMAT!r}")
        here = self.host_facts()
        facts = [("store_format", "store format"), ("arch", "architecture")]
        if m.mode == pb.CHECKPOINT_MODE_FULL:  # CRIU restores only on the same pair
            facts += [("kernel_release", "kernel release"), ("criu_version", "CRIU version")]
        for key, what in facts:
            theirs = getattr(m, key)
            if theirs != here[key]:
                raise FailedPrecondition(
                    f"checkpoint {m.checkpoint_id} cannot be imported here: its {what} is "
                    f"{theirs!r}, this host's is {here[key]!r}")

    # ---- manifest and digests -----------------------------------------------------------

    def _digests(self, ckpt: CheckpointRecord) -> list[tuple[str, int]]:
        """(digest, size) of each layer of the chain, computing the missing ones."""
        store = self._ctx.store
        known = store.layer_digests(ckpt.mount)
        out = []
        for lid in ckpt.mount:
            if lid not in known:
                known[lid] = digest_of_tree(store.layer_path(lid))
                store.record_layer_digest(lid, *known[lid])
            out.append(known[lid])
        return out

    def _manifest(self, ckpt: CheckpointRecord) -> pb.Manifest:
        store = self._ctx.store
        try:
            image_layers = store.get_image(ckpt.image).layer_ids
        except ImageNotFound:  # removed since: its layers still travel, as the chain's
            image_layers = ()
        n_image = len(image_layers) if tuple(ckpt.mount[:len(image_layers)]) == \
            tuple(image_layers) else 0
        images_bytes = 0
        if ckpt.mode == CheckpointMode.FULL:
            images = store.images_path(ckpt.id)
            if not images.is_dir():
                raise FailedPrecondition(f"checkpoint {ckpt.id} has no process images here")
            images_bytes = sum(p.stat().st_size for p in images.iterdir() if p.is_file())
        m = pb.Manifest(
            format=FORMAT, checkpoint_id=ckpt.id, mode=_MODE_PB[ckpt.mode], label=ckpt.label,
            parent_id=ckpt.parent_id, sandbox_id=ckpt.sandbox_id, created_at=ckpt.created_at,
            image=ckpt.image, image_layers=n_image,
            layers=[pb.ManifestLayer(digest=d, size_bytes=n) for d, n in self._digests(ckpt)],
            spec_json=json.dumps(ckpt.spec), stats_json=json.dumps(ckpt.stats),
            images_bytes=images_bytes, **self.host_facts())
        return m

    async def manifest(self, checkpoint_id: str) -> pb.Manifest:
        async with self._ctx.holds.hold(checkpoint_id):
            ckpt = self._ctx.store.get_checkpoint(checkpoint_id)
            return await asyncio.to_thread(self._manifest, ckpt)

    async def have_layers(self, digests: list[str]) -> list[str]:
        """The digests held here. Image layers get their digest on first asking (once
        per layer): two daemons that imported the same image then agree on it."""
        _check_digests(digests, "digests")
        store = self._ctx.store
        held = store.layers_by_digest(digests)
        if len(held) < len(set(digests)):
            await asyncio.to_thread(self._digest_image_layers)
            held = store.layers_by_digest(digests)
        return [d for d in digests if d in held]

    def _digest_image_layers(self) -> None:
        store = self._ctx.store
        ids = [lid for img in store.list_images() for lid in img.layer_ids]
        known = store.layer_digests(ids)
        for lid in ids:
            if lid not in known:
                store.record_layer_digest(lid, *digest_of_tree(store.layer_path(lid)))

    # ---- export ---------------------------------------------------------------------------

    def _export(self, ckpt: CheckpointRecord, skip: set[str]) -> Iterator[pb.ExportChunk]:
        store = self._ctx.store
        m = self._manifest(ckpt)
        w = ChunkWriter()
        yield w.manifest(m)
        sent = skipped = 0
        for lid, layer in zip(ckpt.mount, m.layers):
            if layer.digest in skip:
                skipped += 1
                continue
            yield w.start("layer", layer.digest)
            for piece in tree_records(store.layer_path(lid)):
                yield from w.feed(piece)
            yield from w.end()
            if w.last_sha256 != layer.digest:
                raise FailedPrecondition(f"layer {lid} no longer matches its digest (changed "
                                         "on disk?)")
            sent += 1
        if ckpt.mode == CheckpointMode.FULL:
            yield w.start("images")
            for piece in tree_records(store.images_path(ckpt.id)):
                yield from w.feed(piece)
            yield from w.end()
        yield w.trailer(sent, skipped, self._ctx.config.transfer_key)
        self.bytes.labels("export").inc(w.data_bytes)
        self.layers.labels("sent").inc(sent)
        self.layers.labels("skipped").inc(skipped)
        log.info("checkpoint.exported", checkpoint=ckpt.id, layers_sent=sent,
                 layers_skipped=skipped, bytes=w.data_bytes)

    async def export(self, checkpoint_id: str,
                     skip_layers: list[str]) -> AsyncIterator[pb.ExportChunk]:
        """The checkpoint's stream; a deletion of it waits until the stream ends."""
        _check_digests(skip_layers, "skip_layers")
        async with self._ctx.holds.hold(checkpoint_id):
            ckpt = self._ctx.store.get_checkpoint(checkpoint_id)
            gen = self._export(ckpt, set(skip_layers))
            try:
                while (chunk := await asyncio.to_thread(next, gen, _END)) is not _END:
                    yield chunk
            finally:
                gen.close()

    # ---- import ---------------------------------------------------------------------------

    async def import_stream(self, chunks: AsyncIterator[pb.ExportChunk]) -> CheckpointRecord:
        """Import a stream (see the module doc). Its chunks are read here, on the event
        loop, and handed to a worker thread that writes the layers (bounded queue)."""
        inbox: queue.Queue = queue.Queue(maxsize=8)
        cancelled = threading.Event()

        def pull():
            while True:
                try:
                    item = inbox.get(timeout=0.2)
                except queue.Empty:
                    if cancelled.is_set():  # the call ended midway: stop, clean up
                        raise InvalidArgument("the import was cancelled") from None
                    continue
                if item is _END:
                    return
                yield item

        job = asyncio.ensure_future(asyncio.to_thread(self._import, pull(), cancelled))
        try:
            async for chunk in chunks:
                if job.done():
                    break
                while True:  # put without blocking the loop; the job may stop reading
                    try:
                        inbox.put_nowait(chunk)
                        break
                    except queue.Full:
                        if job.done():
                            break
                        await asyncio.sleep(0.001)
            if not job.done():
                while True:
                    try:
                        inbox.put_nowait(_END)
                        break
                    except queue.Full:
                        if job.done():
                            break
                        await asyncio.sleep(0.001)
            return await job
        except BaseException:
            cancelled.set()  # the worker stops at its next read and removes what it wrote
            if not job.done():
                await asyncio.wait([job])
            if not job.cancelled():
                job.exception()  # seen: the caller's error is the one raised
            raise

    def _import(self, chunks, cancelled: threading.Event) -> CheckpointRecord:
        store = self._ctx.store
        reader = ChunkReader(chunks)
        m = reader.manifest()
        self.check_compatible(m)
        if store.checkpoint_exists(m.checkpoint_id):
            log.info("checkpoint.import_noop", checkpoint=m.checkpoint_id)
            return store.get_checkpoint(m.checkpoint_id)
        digests = [layer.digest for layer in m.layers]
        _check_digests(digests, "manifest layers")
        if m.mode not in _MODE_FROM_PB:
            raise InvalidArgument("transfer stream: the manifest has no checkpoint mode")
        if self._needs_signature(m) and self._ctx.config.transfer_key is None:
            self._refuse(m, refusal(None, b"", b""))   # before reading a byte more
        tmp = store.new_tmp_dir()
        try:
            chain = [ImportedLayer(d.digest, d.size_bytes, None) for d in m.layers]
            images = self._read_sections(reader, m, chain, tmp, cancelled)
            crash_point("transfer.written")
            held = store.layers_by_digest([c.digest for c in chain if c.path is None])
            missing = [c.digest for c in chain if c.path is None and c.digest not in held]
            if missing:
                raise FailedPrecondition(f"the stream skipped layer(s) this daemon does not "
                                         f"hold: {', '.join(missing[:5])}")
            rec = _record_of(m)
            out = store.commit_imported_checkpoint(rec, chain, images)
        finally:
            remove_tree(tmp)
        self.bytes.labels("import").inc(reader.bytes)
        log.info("checkpoint.imported", checkpoint=out.id, mode=out.mode,
                 layers_received=sum(c.path is not None for c in chain), bytes=reader.bytes)
        return out

    def _needs_signature(self, m: pb.Manifest) -> bool:
        return m.mode == pb.CHECKPOINT_MODE_FULL or self._ctx.config.transfer_require_signature

    def _refuse(self, m: pb.Manifest, why: str) -> None:
        what = "a FULL checkpoint (its CRIU images are restored as host root)" \
            if m.mode == pb.CHECKPOINT_MODE_FULL else \
            "a checkpoint, and this daemon requires signed imports (transfer-require-signature)"
        log.warning("checkpoint.import_refused", checkpoint=m.checkpoint_id, reason=why)
        raise PermissionDenied(f"checkpoint {m.checkpoint_id[:80]} was not imported: it is "
                               f"{what}, imported only from a daemon holding this daemon's "
                               f"transfer key; {why}")

    def _read_sections(self, reader: ChunkReader, m: pb.Manifest, chain: list[ImportedLayer],
                       tmp: Path, cancelled: threading.Event) -> Path | None:
        images = None
        index = 0   # the next chain position a layer section may fill
        while True:
            if cancelled.is_set():
                raise InvalidArgument("transfer stream: the import was cancelled")
            c = reader.next("a section or the trailer")
            part = c.WhichOneof("part")
            if part == "trailer":
                reader.expect_end_of_stream()
                if m.mode == pb.CHECKPOINT_MODE_FULL and images is None:
                    raise InvalidArgument("transfer stream: a FULL checkpoint without its "
                                          "process images")
                if self._needs_signature(m):  # nothing of the stream is committed yet
                    why = refusal(self._ctx.config.transfer_key, c.trailer.hmac_sha256,
                                  reader.sha256_before_last)
                    if why is not None:
                        self._refuse(m, why)
                return images
            if part != "start":
                raise InvalidArgument(f"transfer stream: a {part} chunk where a section "
                                      "should start")
            section = Section(reader, c.start)
            if c.start.kind == "layer":
                while index < len(chain) and chain[index].digest != c.start.digest:
                    index += 1
                if index == len(chain) or images is not None:
                    raise InvalidArgument(f"transfer stream: layer {c.start.digest[:80]!r} "
                                          "is not in its manifest (or out of order)")
                target = tmp / f"layer-{index}"
                where = f"layer {index + 1} of {len(chain)}"
            elif c.start.kind == "images" and images is None \
                    and m.mode == pb.CHECKPOINT_MODE_FULL:
                target = images = tmp / "images"
                where = "process images"
            else:
                raise InvalidArgument(f"transfer stream: an unexpected section "
                                      f"{c.start.kind[:40]!r}")
            target.mkdir(mode=0o700)
            write_tree(section, target, where)
            section.finish()
            if c.start.kind == "layer":
                if section.sha256 != c.start.digest:
                    raise InvalidArgument(f"transfer stream corrupt: {where} does not match "
                                          "its digest")
                chain[index].path, chain[index].size = target, section.raw
                index += 1


def _check_digests(digests, what: str) -> None:
    if len(digests) > MAX_DIGESTS:
        raise InvalidArgument(f"{what}: at most {MAX_DIGESTS} digests")
    for d in digests:
        if not (isinstance(d, str) and d.startswith("sha256:") and len(d) == 71
                and all(ch in "0123456789abcdef" for ch in d[7:])):
            raise InvalidArgument(f"{what}: {d[:80]!r} is not a digest (sha256:<64 hex>)")


def _record_of(m: pb.Manifest) -> CheckpointRecord:
    try:
        spec, stats = json.loads(m.spec_json or "{}"), json.loads(m.stats_json or "{}")
    except ValueError:
        raise InvalidArgument("transfer stream: the manifest's spec or stats is not "
                              "JSON") from None
    if not isinstance(spec, dict) or not isinstance(stats, dict):
        raise InvalidArgument("transfer stream: the manifest's spec or stats is not an object")
    if not m.checkpoint_id.startswith("ck-") or len(m.checkpoint_id) > 64 \
            or not m.checkpoint_id[3:].isalnum():
        raise InvalidArgument(f"transfer stream: {m.checkpoint_id[:80]!r} is not a "
                              "checkpoint id")
    # Forks of it are created with its spec, and its stats are shown as numbers: both
    # are checked as this daemon would have made them (the stream may come from anyone).
    spec = check_spec(spec, "transfer stream")
    stats = {k: v for k, v in stats.items() if isinstance(k, str) and len(k) <= 64 and (
        isinstance(v, bool) or isinstance(v, (int, float)) and math.isfinite(v))}
    return CheckpointRecord(m.checkpoint_id, m.sandbox_id[:64], m.parent_id[:64], m.label[:1024],
                            _MODE_FROM_PB[m.mode], m.created_at, (), (), "", False, stats,
                            m.image[:256], spec)
