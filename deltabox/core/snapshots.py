"""Checkpoints (DeltaFS) and the checkpoint tree: take, list, diff, delete, pin, squash.

A checkpoint freezes the sandbox's cgroup, sinks the branch's upper directory into a new
immutable layer (reflinks; `deltafs.sink_upper_into_layer`), and -- for a full checkpoint --
has DeltaCR dump the processes in the same frozen instant (`deltabox.core.deltacr`); then
it thaws and records the checkpoint in one store transaction. Afterwards, in the
background: the sandbox's standby for it is prepared, a deep chain is squashed into one
layer, a full checkpoint's images are deduplicated.

A background checkpoint (`background=True`) replies after the thaw -- the cut -- and is
recorded by a daemon task that holds the sandbox's lifecycle lock meanwhile; calls that
name it wait for it (`settled`), WaitCheckpoint returns it (`wait_checkpoint`). Not
durable until recorded (docs/deltacr.md, "Background checkpoints").

A checkpoint of a sandbox that did nothing since its head checkpoint -- no file changed
in its upper directory, no call ran in it, no process started, ended or used CPU
(`incarnation.cpu_activity`), all seen in the frozen instant -- is not taken again: the
head is returned, flagged `unchanged` (a full request needs a full head).

Deleting a checkpoint waits for the rollbacks, forks and double builds that hold it
(`runtime.CheckpointHolds`); its standbys and warm pools go before its files. A squash
frees the layers of the chains it replaced once the operations holding those checkpoints
(which may have read the old chain) are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path

import structlog

from deltabox.core import deltafs
from deltabox.core.deltacr import DeltaCR, Standbys
from deltabox.core.incarnation import cpu_activity
from deltabox.core.runtime import Runtime, SandboxContext
from deltabox.core.warm import WarmPools
from deltabox.errors import FailedPrecondition, InvalidArgument, NotFound
from deltabox.faults import crash_point, hold_point
from deltabox.store.checkpoints import CheckpointInUse
from deltabox.store.layout import remove_tree
from deltabox.store.records import CheckpointRecord, SandboxRecord
from deltabox.types import CheckpointMode

__all__ = ["Snapshots", "rmtree_quiet", "DELETE_WAIT_S"]

log = structlog.get_logger("deltabox.core.snapshots")

DELETE_WAIT_S = 150.0  # a deletion waits this long for rollbacks/forks of it (> CRIU's timeout)
SQUASH_GC_WAIT_S = DELETE_WAIT_S  # a squash frees old layers once their readers are done
FAILED_KEPT = 256  # background checkpoints that failed: their errors kept for later calls


def _upper_changed(scan: dict, manifest: deltafs.Manifest) -> bool:
    """Whether `scan` (deltafs.scan_upper) differs from the upper at the last checkpoint:
    an entry new or changed, or one gone."""
    prev = manifest.entries  # "" (the upper itself) is never sunk: not compared
    return any(rel and prev.get(rel, 0) != key for rel, (key, _) in scan.items()) \
        or any(rel and rel not in scan for rel in prev)


def rmtree_quiet(path: Path) -> None:
    try:
        remove_tree(path)
    except OSError as e:
        log.warning("cleanup.failed", path=str(path), error=str(e))


@dataclasses.dataclass
class _Cut:
    """A checkpoint's frozen instant, taken but not recorded yet: the tmp layer dir
    (None: no file changed) and images dir that hold it, and the record planned for it
    (`Store.plan_checkpoint`: its id is already known)."""
    rec: SandboxRecord
    planned: CheckpointRecord
    base: tuple[str, ...]
    base_mount: tuple[str, ...]
    tmp: Path | None
    images: Path | None
    manifest: deltafs.Manifest
    cut: tuple | None
    frozen_ms: float
    t0: float
    sink_ms: float


class Snapshots:
    """Checkpoints of running sandboxes, and their tree."""

    def __init__(self, ctx: SandboxContext, deltacr: DeltaCR, standbys: Standbys,
                 pools: WarmPools) -> None:
        self._ctx = ctx
        self.store = ctx.store
        self.config = ctx.config
        self._deltacr = deltacr
        self._standbys = standbys
        self._pools = pools
        self._squash_lock = asyncio.Lock()  # one squash at a time: it is I/O heavy
        self._squash_again: set[str] = set()  # asked for while one ran: see _maybe_squash
        # Background checkpoints being recorded: id -> (sandbox id, the recording task);
        # and the errors of the last FAILED_KEPT that failed (see `settled`).
        self._pending: dict[str, tuple[str, asyncio.Task]] = {}
        self._failed: dict[str, BaseException] = {}

    async def checkpoint(self, ref: str, label: str = "", mode: str = CheckpointMode.FS,
                         wait_ready: bool = False,
                         rollback_likely: bool | None = None,
                         background: bool = False) -> CheckpointRecord:
        """Checkpoint a sandbox; its body double (full) or standby (fs) is then built
        in the background -- or before returning, with `wait_ready` (see `ready`).

        With `background` the call returns once the cut is taken (`_take_cut`): the
        record is written by a daemon task (`_record_in_background`) that holds the
        sandbox's lifecycle lock until it is done, so the next checkpoint, a rollback
        or a destroy of this sandbox come after it; calls naming the checkpoint wait
        for it through `settled`. Exec and file calls need none of it: the cut has
        captured the files already, so they go on at once."""
        if mode not in (CheckpointMode.FS, CheckpointMode.FULL):
            raise InvalidArgument(f"checkpoint mode must be 'fs' or 'full', not {mode!r}")
        if len(label) > 1024 or "\0" in label:
            raise InvalidArgument("label must be at most 1024 characters without NUL")
        if background and wait_ready:
            raise InvalidArgument("background and wait_ready exclude each other: background "
                                  "replies before the checkpoint is recorded, wait_ready "
                                  "after its double is built (use WaitCheckpoint, then Warm)")
        rec, rt = self._ctx.running(ref)
        if background:
            return await self._checkpoint_in_background(rec, rt, label, mode,
                                                        rollback_likely)
        async with rt.lock:
            rt.refuse_closed(rec.name)
            async with self._deltacr.quiesced(rec, rt, mode):
                ckpt = await asyncio.to_thread(self._checkpoint_blocking, rec.id, rt, label,
                                               mode)
        standby = self._after_checkpoint(rec.id, ckpt, mode, rollback_likely, wait_ready)
        if wait_ready:
            await asyncio.shield(standby)  # a cancelled call leaves the build running
            with contextlib.suppress(NotFound):  # the build may have marked it unusable
                fresh = self.store.get_checkpoint(ckpt.id)
                ckpt = dataclasses.replace(ckpt, unusable_reason=fresh.unusable_reason,
                                           unusable_criu=fresh.unusable_criu)
        return ckpt

    def _after_checkpoint(self, sandbox_id: str, ckpt: CheckpointRecord, mode: str,
                          rollback_likely: bool | None, urgent: bool) -> asyncio.Task:
        """Metrics and log of a recorded checkpoint; start its standby (returned), the
        squash and the image deduplication in the background."""
        if ckpt.stats.get("unchanged"):
            log.info("checkpoint.unchanged", sandbox=sandbox_id, checkpoint=ckpt.id,
                     mode=mode)
            return self._ctx.spawn(self._standbys.prepare(
                sandbox_id, ckpt.id, rollback_likely=rollback_likely, urgent=urgent))
        metrics = self._ctx.metrics
        metrics.checkpoints.labels(mode).inc()
        metrics.frozen.labels(mode).observe(ckpt.stats["frozen_ms"] / 1000)
        metrics.image_bytes.inc(ckpt.stats.get("image_bytes", 0))
        log.info("checkpoint.created", sandbox=sandbox_id, checkpoint=ckpt.id,
                 layers=len(ckpt.layers), **ckpt.stats)
        standby = self._ctx.spawn(self._standbys.prepare(
            sandbox_id, ckpt.id, rollback_likely=rollback_likely, urgent=urgent))
        self._ctx.spawn(self._maybe_squash(ckpt.id))
        self._deltacr.after_checkpoint(ckpt)
        return standby

    # ---- background checkpoints: reply at the cut, record afterwards ----------------

    async def _checkpoint_in_background(self, rec: SandboxRecord, rt: Runtime, label: str,
                                        mode: str,
                                        rollback_likely: bool | None) -> CheckpointRecord:
        """The cut under the lifecycle lock, then the lock handed to the task that
        records it (released when it ends): nothing that changes the sandbox's chain
        can slip in between the cut and the record."""
        await rt.lock.acquire()
        try:
            rt.refuse_closed(rec.name)
            async with self._deltacr.quiesced(rec, rt, mode):
                cut = await asyncio.to_thread(self._take_cut, rec.id, rt, label, mode)
        except BaseException:
            rt.lock.release()
            raise
        if isinstance(cut, CheckpointRecord):  # unchanged: the head, recorded long ago
            rt.lock.release()
            self._after_checkpoint(rec.id, cut, mode, rollback_likely, False)
            return cut
        ckpt = cut.planned
        task = self._ctx.spawn(self._record_in_background(rt, cut, mode, rollback_likely))
        self._pending[ckpt.id] = (rec.id, task)
        task.add_done_callback(lambda t, cid=ckpt.id: self._pending_ended(cid, t))
        log.info("checkpoint.cut", sandbox=rec.id, checkpoint=ckpt.id, mode=mode,
                 frozen_ms=round(cut.frozen_ms, 2))
        return dataclasses.replace(ckpt, stats={**ckpt.stats, "frozen_ms": cut.frozen_ms,
                                                "cut_ms": cut.sink_ms})

    async def _record_in_background(self, rt: Runtime, cut: "_Cut", mode: str,
                                    rollback_likely: bool | None) -> CheckpointRecord:
        """Record a background checkpoint (its layer and images renamed into place, its
        row committed), then what follows any checkpoint. Holds rt.lock, handed over by
        `_checkpoint_in_background`, until the record is written."""
        try:
            ckpt = await asyncio.to_thread(self._record_cut, rt, cut, True)
        except BaseException as e:
            log.error("checkpoint.background_failed", sandbox=cut.planned.sandbox_id,
                      checkpoint=cut.planned.id, error=str(e))
            raise
        finally:
            rt.lock.release()
        self._after_checkpoint(ckpt.sandbox_id, ckpt, mode, rollback_likely, False)
        return ckpt

    def _pending_ended(self, checkpoint_id: str, task: asyncio.Task) -> None:
        """A background checkpoint is recorded, or failed: its error is kept (the last
        FAILED_KEPT) for the calls that name it later."""
        self._pending.pop(checkpoint_id, None)
        if task.cancelled():
            self._failed[checkpoint_id] = FailedPrecondition(
                f"checkpoint {checkpoint_id} was not recorded: the daemon is stopping")
        elif task.exception() is not None:
            self._failed[checkpoint_id] = task.exception()
        else:
            return
        while len(self._failed) > FAILED_KEPT:
            self._failed.pop(next(iter(self._failed)))

    def pending(self, checkpoint_id: str) -> bool:
        """Whether the checkpoint is a background one still being recorded."""
        return checkpoint_id in self._pending

    async def settled(self, *refs: str) -> None:
        """Wait until each of `refs` that is a pending background checkpoint is
        recorded; raise the error one hit (then, or earlier). Other refs (recorded
        checkpoints, sandboxes, unknown ids) pass at once."""
        for ref in refs:
            entry = self._pending.get(ref)
            if entry is not None:
                await asyncio.shield(entry[1])
            elif ref in self._failed:
                raise self._failed[ref]

    async def settled_sandbox(self, sandbox_id: str) -> None:
        """Wait for the sandbox's pending background checkpoints (their errors aside:
        a failed one is simply not there)."""
        tasks = [t for sid, t in list(self._pending.values()) if sid == sandbox_id]
        if tasks:
            await asyncio.wait([asyncio.shield(t) for t in tasks])

    async def wait_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        """The checkpoint once recorded (with the timings its Checkpoint call saw, if
        it was pending), or the error its background work hit."""
        entry = self._pending.get(checkpoint_id)
        if entry is not None:
            return await asyncio.shield(entry[1])
        await self.settled(checkpoint_id)
        return self.store.get_checkpoint(checkpoint_id)

    # ---- the cut and the record -----------------------------------------------------

    def _checkpoint_blocking(self, sandbox_id: str, rt: Runtime, label: str,
                             mode: str) -> CheckpointRecord:
        """Sink (and dump), then record, in one worker thread (one hop off the loop)."""
        cut = self._take_cut(sandbox_id, rt, label, mode)
        return cut if isinstance(cut, CheckpointRecord) else self._record_cut(rt, cut)

    def _take_cut(self, sandbox_id: str, rt: Runtime, label: str,
                  mode: str) -> "CheckpointRecord | _Cut":
        """The frozen instant: sink (and dump) into tmp dirs, thaw, and plan the record
        (its ids). Returns the head instead when it stands for this instant."""
        rec = self.store.get_sandbox(sandbox_id)
        t0 = time.perf_counter()
        head = self._reusable_head(rec, rt, mode)
        images = self._deltacr.new_images_dir(mode)
        try:
            tmp, manifest, stats, frozen_ms, cut, same = self._sink(rec, rt, images, head)
        except BaseException:
            if images is not None:
                rmtree_quiet(images)
            raise
        if same:
            if images is not None:
                rmtree_quiet(images)
            return dataclasses.replace(head, stats={**head.stats, "unchanged": True,
                                                    "unchanged_frozen_ms": frozen_ms})
        try:
            lower = self.store.get_branch(rec.branch_id).lower
            base = lower + tuple(rt.own_layers)
            # What to mount: the head's chain (squashed, once it is) plus the new layer.
            base_mount = self.shortest_mount(rec.head) if rec.head and rt.own_layers \
                else lower
            planned = self.store.plan_checkpoint(
                rec, label, mode, base, base_mount, tmp,
                {"changed": stats.changed, "whiteouts": stats.whiteouts,
                 "cloned_bytes": stats.cloned_bytes, **stats.phases_ms})
        except BaseException:
            for d in (tmp, images):
                if d is not None:
                    rmtree_quiet(d)
            raise
        return _Cut(rec, planned, base, base_mount, tmp, images, manifest, cut, frozen_ms,
                    t0, 1000 * (time.perf_counter() - t0))

    def _record_cut(self, rt: Runtime, cut: "_Cut", background: bool = False
                    ) -> CheckpointRecord:
        """Commit layer + images + row in one transaction; the runtime then knows the
        new head (its layers, manifest and cut). On failure the tmp dirs go."""
        if background:
            hold_point("checkpoint.background")  # a crash test's window: pending
        t1 = time.perf_counter()
        p = cut.planned
        try:
            ckpt = self.store.commit_checkpoint(cut.rec, p.label, p.mode, cut.base,
                                                cut.base_mount, cut.tmp, p.stats,
                                                cut.images, planned=p)
        except BaseException:
            for d in (cut.tmp, cut.images):
                if d is not None:
                    rmtree_quiet(d)
            raise
        crash_point("checkpoint.committed")
        t2 = time.perf_counter()
        if cut.tmp is not None:
            rt.own_layers.append(ckpt.layers[-1])
        rt.manifest = cut.manifest
        rt.last_cut = (ckpt.id, cut.cut) if cut.cut is not None else None
        ckpt = dataclasses.replace(ckpt, stats={
            **ckpt.stats, "frozen_ms": cut.frozen_ms, "sink_ms": cut.sink_ms,
            "commit_ms": 1000 * (t2 - t1), "total_ms": 1000 * (t2 - cut.t0)})
        return ckpt

    def _reusable_head(self, rec: SandboxRecord, rt: Runtime,
                       mode: str) -> CheckpointRecord | None:
        """The head checkpoint, if this incarnation took it (its frozen instant is in
        rt.last_cut) and it answers a `mode` request: a full one needs a full head."""
        if rt.last_cut is None or not rec.head or rt.last_cut[0] != rec.head:
            return None
        try:
            head = self.store.get_checkpoint(rec.head)
        except NotFound:
            return None
        if head.unusable_reason or (mode == CheckpointMode.FULL
                                    and head.mode != CheckpointMode.FULL):
            return None
        return head

    def _cut(self, rec: SandboxRecord, rt: Runtime) -> tuple | None:
        """The frozen sandbox's activity so far (None while a call is attached: what it
        does may land after the thaw)."""
        gate = rt.gate
        if gate.active or gate.controls:
            return None
        activity = cpu_activity(self._ctx.cgroups.pids(rec.branch_id), rt.init_pid)
        return None if activity is None else (rec.branch_id, rt.init_pid, gate.calls,
                                              activity)

    def shortest_mount(self, checkpoint_id: str) -> tuple[str, ...]:
        """The checkpoint's mount chain, rebased on its nearest squashed ancestor on
        the same lineage: checkpoints taken while a squash ran mount the squashed
        layer plus their newer layers as soon as it is there."""
        head = self.store.get_checkpoint(checkpoint_id)
        if len(head.mount_layers) <= self.config.max_chain_depth:
            return head.mount_layers
        anc = head
        while anc.parent_id:
            anc = self.store.get_checkpoint(anc.parent_id)
            if head.layers[:len(anc.layers)] != anc.layers:
                break  # another lineage (a rollback target's chain)
            if anc.squashed:
                return anc.mount_layers + head.layers[len(anc.layers):]
        return head.mount_layers

    def _sink(self, rec: SandboxRecord, rt: Runtime, images: Path | None = None,
              head: CheckpointRecord | None = None):
        """Freeze, (dump the processes into `images`,) sink the upper's changes into a
        new tmp layer dir -- one frozen instant -- and thaw. The files are sunk after the
        dump: CRIU leaves traces in them (a temporary mountpoint under /tmp), which
        belong to this checkpoint, not to the next.

        With `head` (a checkpoint that may be returned instead): if no file changed and
        the cut (`_cut`) is the head's, nothing is dumped or sunk.

        Returns (tmp dir or None if no file changed, new manifest, stats, ms frozen, the
        cut, whether the head stands for this instant)."""
        cgroups = self._ctx.cgroups
        upper = self.store.branches_dir / rec.branch_id / "upper"
        manifest = rt.manifest or deltafs.Manifest()
        tmp = self.store.new_tmp_dir()
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        cgroups.freeze(rec.branch_id)
        t1 = time.perf_counter()
        try:
            cut, scan = self._cut(rec, rt), None
            if head is not None and cut is not None and rt.last_cut == (head.id, cut):
                scan = deltafs.scan_upper(upper)
                if not _upper_changed(scan, manifest):
                    cgroups.thaw(rec.branch_id)
                    rmtree_quiet(tmp)
                    return (None, manifest, deltafs.SinkStats(),
                            1000 * (time.perf_counter() - t0), cut, True)
            if images is not None:
                phases.update(self._deltacr.dump_frozen(rec, rt, images))
                # CRIU's parasite ran inside each process (their CPU time moved) and
                # CRIU touched the files: this checkpoint stands for the cut after it.
                cut, scan = self._cut(rec, rt), None
            t_sink = time.perf_counter()
            stats, new_manifest = deltafs.sink_upper_into_layer(upper, tmp, manifest, scan)
            crash_point("checkpoint.sink")
            if images is not None:
                phases["sink_fs_ms"] = 1000 * (time.perf_counter() - t_sink)
        except BaseException:
            cgroups.thaw(rec.branch_id)
            rmtree_quiet(tmp)
            raise
        t2 = time.perf_counter()
        cgroups.thaw(rec.branch_id)
        t3 = time.perf_counter()
        frozen_ms = 1000 * (t3 - t0)
        stats.phases_ms.update({**phases, "freeze_ms": 1000 * (t1 - t0),
                                "copy_ms": 1000 * (t2 - t1), "thaw_ms": 1000 * (t3 - t2)})
        if stats.changed == 0 and stats.whiteouts == 0:
            rmtree_quiet(tmp)
            tmp = None
        return tmp, new_manifest, stats, frozen_ms, cut, False

    # ---- the tree ------------------------------------------------------------------

    def list_checkpoints(self, ref: str) -> list[CheckpointRecord]:
        return self.store.checkpoint_tree(self._ctx.get(ref))

    def _chain_for(self, ref: str) -> list[Path]:
        """Layer dirs of a checkpoint, or of a live sandbox (its lower + its upper).

        Only these roots are host paths (the daemon's own directories); everything
        below them is the sandbox's, and deltafs reaches it fd-relative only."""
        try:
            ckpt = self.store.get_checkpoint(ref)
            return [self.store.layer_path(lid) for lid in ckpt.mount_layers]
        except NotFound:
            pass
        try:
            rec = self._ctx.get(ref)
        except NotFound:
            raise NotFound(f"{ref!r} is neither a checkpoint nor a sandbox") from None
        lower = self.store.get_branch(rec.branch_id).lower
        return [self.store.layer_path(lid) for lid in lower] + [
            self.store.branches_dir / rec.branch_id / "upper"]

    async def diff(self, a: str, b: str) -> list[tuple[str, str]]:
        if not a or not b:
            raise InvalidArgument("diff needs two checkpoints (or sandboxes)")
        chain_a, chain_b = self._chain_for(a), self._chain_for(b)
        # A live sandbox's upper is read while its processes run, not frozen: a diff
        # can take long and would stop the agent for all of it. Safe because deltafs
        # resolves every path below a tree's fd without following symlinks, so a
        # directory swapped for a symlink to / is seen as a change, never walked.
        return await asyncio.to_thread(deltafs.diff_chains, chain_a, chain_b)

    async def delete_checkpoint(self, checkpoint_id: str, cascade: bool) -> list[str]:
        """Delete a checkpoint (with cascade, its subtree). Ordered after the rollbacks,
        forks and double builds in flight on any of them: it waits for them (then,
        e.g., refuses the checkpoint a rollback just made a sandbox's head)."""
        holds = self._ctx.holds
        self.store.get_checkpoint(checkpoint_id)
        while True:
            try:
                deleted = await asyncio.to_thread(self.store.delete_checkpoint, checkpoint_id,
                                                  cascade, holds.busy, False)
                break
            except CheckpointInUse as e:
                for cid in e.checkpoint_ids:  # builds still queued for them: none now
                    await self._pools.drop(cid)
                    await self._standbys.drop_for(cid)
                await holds.wait_released(e.checkpoint_ids, DELETE_WAIT_S)
        for cid in deleted:  # standbys and warm pools sit on them: gone before their files
            await self._pools.drop(cid)
            await self._standbys.drop_for(cid)
        await asyncio.to_thread(self.store.remove_checkpoint_files, deleted)
        return deleted

    def pin_checkpoint(self, checkpoint_id: str, pinned: bool) -> CheckpointRecord:
        return self.store.set_pinned(checkpoint_id, pinned)

    async def _maybe_squash(self, checkpoint_id: str) -> None:
        """Squash a deep chain into one layer (reflinks) so lookups stay flat."""
        try:
            ckpt = self.store.get_checkpoint(checkpoint_id)
        except NotFound:
            return
        if len(ckpt.mount_layers) <= self.config.max_chain_depth or ckpt.squashed:
            return
        if self._squash_lock.locked():
            # Coalesce: looked at again when the running squash ends (it may have been
            # taken before that squash was there to rebase it on, and be the last one).
            self._squash_again.add(checkpoint_id)
            return
        remounted: list[str] = []  # checkpoints whose mount chain it changed
        async with self._squash_lock:
            tmp = self.store.new_tmp_dir()
            try:
                mount = ckpt.mount_layers
                # Keep the image's layers and squash what the sandbox added above
                # them (a delta squash: cost follows the changes, not the image).
                try:
                    image = self.store.get_image(ckpt.image).layer_ids
                except NotFound:
                    image = ()
                base = image if mount[:len(image)] == image and image else ()
                chain = [self.store.layer_path(lid) for lid in mount[len(base):]]
                squash = deltafs.squash_deltas if base else deltafs.squash_chain
                t0 = time.perf_counter()
                n = await asyncio.to_thread(squash, chain, tmp / "layer")
                if await asyncio.to_thread(self.store.set_squashed, checkpoint_id, base,
                                           tmp / "layer", mount):
                    remounted.append(checkpoint_id)
                # Checkpoints taken while it ran extend it: rebase them on it.
                remounted += await asyncio.to_thread(self.store.rebase_on_squashed,
                                                     checkpoint_id)
                log.info("checkpoint.squashed", checkpoint=checkpoint_id, depth=len(mount),
                         kept=len(base), entries=n,
                         ms=round(1000 * (time.perf_counter() - t0), 1))
            except NotFound:
                pass
            finally:
                await asyncio.to_thread(rmtree_quiet, tmp)
            # Checkpoints committed after the rebase above, from a chain read before it:
            # rebase them too (metadata only), then squash whichever is still too deep.
            remounted += await asyncio.to_thread(self.store.rebase_on_squashed,
                                                 checkpoint_id)
            again, self._squash_again = self._squash_again, set()
        for cid in again:  # with the lock free (or they would only be put back)
            self._ctx.spawn(self._maybe_squash(cid))
        await self._free_old_chains(remounted)

    async def _free_old_chains(self, remounted: list[str]) -> None:
        """Free the layers the squash let go -- once no rollback, fork, double build or
        warm-up that may have read one of `remounted`'s old chains still runs: each
        holds its checkpoint (`runtime.CheckpointHolds`) before it reads the record, and
        mounts the chain it read (freed under it, a layer vanished mid-restore:
        FileNotFoundError). Still held after SQUASH_GC_WAIT_S: left to the next gc."""
        try:
            await self._ctx.holds.wait_released(remounted, SQUASH_GC_WAIT_S)
        except FailedPrecondition:
            log.info("squash.gc_deferred", checkpoints=remounted)
            return
        await asyncio.to_thread(self.store.gc_layers)
