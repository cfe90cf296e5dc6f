"""DeltaCR: checkpoints of a sandbox's processes (CRIU), and the incarnations made from them.

Every rule that distinguishes a full checkpoint from a filesystem one lives here; the rest
of the core asks this module instead of testing the mode itself:

- Taking one (`DeltaCR.quiesced`, `dump_frozen`): CRIU is required (a NAT sandbox's network
  namespace is dumped empty and its veth attached again to each incarnation); the
  sandbox's dump gate is closed, calls attached to init (exec, session code, shell) make
  it refuse, job-control-stopped processes make it refuse (CRIU would hang on
  them in a frozen cgroup), short calls are waited for, init's barrier is crossed; then the
  processes are dumped in the same frozen instant as DeltaFS sinks the files. Afterwards the
  images are deduplicated against the parent's (`after_checkpoint`).
- Restoring one: a fresh branch with the checkpoint's processes (`images_for` tells the
  launcher what to restore), left frozen as a **body double** (`build_double`) and thawed
  when it takes over (`wake`); a fork's children are re-seeded (`reseed`).
- Judging one: a full checkpoint whose restores fail twice the same way is marked unusable
  (with CRIU's reason and build), and refused at once afterwards (`refuse_unusable`).
- `Standbys` (`deltabox.core.standbys`, re-exported here): each running sandbox keeps
  prepared incarnations of its hot checkpoints (the
  last few it made or rolled back to, pinned ones, those named in a Warm) -- body doubles
  (full) or fresh inits on the checkpoint's files (fs) -- within the memory budget, so a
  rollback to one is a record swap (`deltabox.core.rollback`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import re
from pathlib import Path

import structlog

from deltabox.core.after_reply import after_reply
from deltabox.core.files import SandboxFiles
from deltabox.core.incarnation import Incarnations
from deltabox.core.runtime import Runtime, SandboxContext, Standby
from deltabox.core.sessions import Sessions
from deltabox.errors import FailedPrecondition, NotFound
from deltabox.host.cgroups import BACKGROUND_NICE
from deltabox.host.criu import CriuError, Swrk
from deltabox.store.records import CheckpointRecord, SandboxRecord, new_id
from deltabox.types import CheckpointMode, RollbackPath, SessionKind

# Standbys (each sandbox's doubles of its hot checkpoints) live in deltabox.core.standbys;
# re-exported here, where the rest of the core has always found them.
from deltabox.core.standbys import Standbys  # noqa: E402

__all__ = ["DeltaCR", "Standbys", "criu_own_failure", "comparable"]

log = structlog.get_logger("deltabox.core.deltacr")

# errno names in CRIU's error lines that say the host ran short, not that the
# images are bad: such a failure never marks a checkpoint unusable.
_SHORTAGE = ("ENOSPC", "No space left", "ENOMEM", "Cannot allocate memory", "EAGAIN",
             "Resource temporarily unavailable", "EMFILE", "ENFILE", "Too many open files",
             "EDQUOT", "Disk quota exceeded")


# CRIU restoring a body double runs at nice BACKGROUND_NICE (deltabox.host.cgroups), and
# the double's cgroup weighs like it (see _launch_in_background).


def criu_own_failure(e: Exception) -> bool:
    """A restore CRIU itself refused (not a timeout, not a shortage of memory, disk,
    pids or fds, not the daemon's own mount or cgroup work)."""
    return isinstance(e, CriuError) and not e.timed_out \
        and not any(s in f"{e} {e.lines}" for s in _SHORTAGE)


def comparable(lines: str) -> str:
    """CRIU error lines with the numbers (pids, fds, ids) blanked out."""
    return re.sub(r"\d+", "N", lines)


class DeltaCR:
    """Full checkpoints: take, restore, judge."""

    def __init__(self, ctx: SandboxContext, incarnations: Incarnations,
                 sessions: Sessions) -> None:
        self._ctx = ctx
        self.store = ctx.store
        self.cgroups = ctx.cgroups
        self._incarnations = incarnations
        self._sessions = sessions
        # Sandbox id -> the `criu swrk` started for its next dump, before the freeze;
        # and the one dumping it now (`dump_frozen`). `abort_dumps` kills both.
        self._swrks: dict[str, Swrk] = {}
        self._dumping: dict[str, Swrk] = {}

    # ---- taking a full checkpoint -----------------------------------------------------

    @contextlib.asynccontextmanager
    async def quiesced(self, rec: SandboxRecord, rt: Runtime, mode: str):
        """Around a checkpoint (the caller holds rt.lock): for a full one, the sandbox's
        processes are made dumpable first and the gate stays closed until it is done."""
        if mode != CheckpointMode.FULL:
            yield
            return
        criu = self._ctx.require_criu()
        # CRIU's kernel-feature cache, so that the dump does not probe the kernel while
        # the sandbox is frozen (written at start-up; again if another CRIU build
        # deleted it). Outside the frozen window, off the event loop.
        await asyncio.to_thread(criu.ensure_kdat_cache)
        # Close the gate first: calls arriving from now on wait for the dump.
        rt.gate.close()
        try:
            if rt.gate.active:
                raise FailedPrecondition(
                    f"{rt.gate.active} call(s) are running in sandbox {rec.name} (exec, "
                    "session code or shell); a full checkpoint needs them finished, "
                    "because their connections to the daemon cannot be restored. Idle "
                    "sessions are fine.")
            await asyncio.to_thread(self._refuse_stopped, rec, rt.branch_id)
            await rt.gate.controls_done(rec.name)
            await rt.channel.barrier()
            # CRIU started now, so its exec and start-up are not in the frozen window.
            self._swrks[rec.id] = await asyncio.to_thread(criu.start_swrk)
            # A destroy (or the shutdown) that came meanwhile: no dump. One that comes
            # later finds this criu in `_swrks` and kills it (`abort_dumps`).
            rt.refuse_closed(rec.name)
            yield
        finally:
            try:
                unused = self._swrks.pop(rec.id, None)  # nothing was dumped (unchanged)
                if unused is not None:
                    await asyncio.to_thread(unused.close)
            finally:
                rt.gate.open()

    def abort_dumps(self, sandbox_id: str | None = None) -> int:
        """Kill the criu of the full checkpoints in progress (of one sandbox, or all):
        a destroy, or a shutdown that stops the sandboxes, does not wait behind a dump
        (nor one that hangs in the kernel until CRIU's timeout). The checkpoint fails
        with FailedPrecondition (`dump_frozen`). Not for sandboxes that live on: a dump
        killed midway can leave CRIU's parasite in their processes. How many."""
        swrks = [w for started in (self._swrks, self._dumping)
                 for s, w in list(started.items()) if sandbox_id in (None, s)]
        for swrk in swrks:
            swrk.kill()
        if swrks:
            self._incarnations.reap_orphans_soon()  # criu's helpers, now the daemon's
        return len(swrks)

    def _refuse_stopped(self, rec: SandboxRecord, branch_id: str) -> None:
        """CRIU cannot seize a job-control-stopped task in a frozen cgroup (it hangs
        in the kernel): refuse before freezing, naming the process."""
        for pid in self.cgroups.pids(branch_id):
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue
            for task in tasks:
                try:
                    state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                if state in ("T", "t"):
                    from deltabox.host.criu import _sandbox_pid
                    raise FailedPrecondition(
                        f"{_sandbox_pid(pid)} in sandbox {rec.name} is stopped (SIGSTOP or "
                        "job control); CRIU cannot checkpoint a stopped process in a frozen "
                        "sandbox: continue it (kill -CONT) first")

    def new_images_dir(self, mode: str) -> Path | None:
        """Where a checkpoint's process images go (None: a filesystem checkpoint)."""
        return self.store.new_tmp_dir() if mode == CheckpointMode.FULL else None

    def dump_frozen(self, rec: SandboxRecord, rt: Runtime, images: Path) -> dict[str, float]:
        """Dump the frozen sandbox's processes into `images`; the phases' stats."""
        criu = self._ctx.require_criu()
        swrk = self._swrks.get(rec.id) or criu.start_swrk()
        self._dumping[rec.id] = swrk  # in one of the two at every instant: see abort_dumps
        self._swrks.pop(rec.id, None)  # not `quiesced`'s to close any more: `dump`'s
        try:
            dump = criu.dump(rt.init_pid, images, self.store.mnt_dir / rec.branch_id,
                             self.cgroups.freezer_path(rec.branch_id), swrk=swrk)
        except (CriuError, OSError) as e:
            if rt.closed:  # its criu killed by `abort_dumps`, not CRIU's failure
                raise FailedPrecondition(f"sandbox {rec.name} was destroyed (or the daemon "
                                         "stopped) during its full checkpoint") from e
            raise
        finally:
            self._dumping.pop(rec.id, None)
        return {"dump_ms": dump.ms, "image_bytes": dump.image_bytes}

    def after_checkpoint(self, ckpt: CheckpointRecord) -> None:
        if ckpt.mode == CheckpointMode.FULL:
            self._ctx.spawn(self._dedupe_images(ckpt))

    async def _dedupe_images(self, ckpt: CheckpointRecord) -> None:
        """Share the pages a full checkpoint has in common with its parent's dump."""
        try:
            parent = self.store.get_checkpoint(ckpt.parent_id) if ckpt.parent_id else None
        except NotFound:
            return
        if parent is None or parent.mode != CheckpointMode.FULL:
            return
        await self._after_doubles(ckpt.sandbox_id)
        from deltabox.host.dedupe import dedupe_pages
        shared = await asyncio.to_thread(dedupe_pages, self.store.images_path(parent.id),
                                         self.store.images_path(ckpt.id))
        await asyncio.to_thread(self.store.update_stats, ckpt.id, {"shared_bytes": shared})
        log.info("checkpoint.images_deduplicated", checkpoint=ckpt.id, shared_bytes=shared)

    async def _after_doubles(self, sandbox_id: str, at_most: float = 2.0) -> None:
        """Let the sandbox's doubles being built go first (a rollback may be waiting
        for one); deduplication can wait."""
        rt = self._ctx.runtimes.get(sandbox_id)
        if rt is not None and rt.standby.is_filling():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(rt.standby.filling), at_most)

    # ---- restoring one ---------------------------------------------------------------

    def images_for(self, ckpt: CheckpointRecord) -> Path | None:
        """What a new incarnation of `ckpt` restores (None: it starts a fresh init)."""
        return self.store.images_path(ckpt.id) if ckpt.mode == CheckpointMode.FULL else None

    def rollback_path(self, ckpt: CheckpointRecord, prepared: bool,
                      waited: bool) -> RollbackPath:
        if ckpt.mode == CheckpointMode.FULL:
            if prepared:
                return RollbackPath.DOUBLE_WAITED if waited else RollbackPath.DOUBLE
            return RollbackPath.RESTORE
        if prepared:
            return RollbackPath.STANDBY_WAITED if waited else RollbackPath.STANDBY
        return RollbackPath.FRESH

    def wake(self, ckpt: CheckpointRecord, branch_id: str, reply_first: bool = False) -> None:
        """A prepared incarnation takes over: a body double (built at BACKGROUND_NICE's
        CPU weight) gets its weight back and is thawed, and its processes go on exactly
        where the dump left them (no signal is delivered to them).

        `reply_first` (a rollback, on the event loop, its record switched): the thaw
        (~0.1 ms) happens once the call's reply has left (`deltabox.core.after_reply`),
        before the caller's next call can arrive (a call into the sandbox meanwhile
        only waits for it); the weight (a cpu.shares write, ~0.2 ms on the event loop)
        then in a worker thread. A crash before either: start-up reconciliation thaws
        the sandbox and gives the weight back."""
        if ckpt.mode != CheckpointMode.FULL:
            return
        if reply_first:
            after_reply(self._thaw_then_weigh, branch_id)
        else:
            self.cgroups.set_background(branch_id, False)
            self.cgroups.thaw(branch_id)

    def _thaw_then_weigh(self, branch_id: str) -> None:
        try:
            self.cgroups.thaw(branch_id)
        except OSError as e:
            # A destroy that waited behind the rollback removed the cgroup already.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise
            log.info("double.gone_before_thaw", branch=branch_id)
            return
        self._ctx.spawn(self._weigh(branch_id))

    async def _weigh(self, branch_id: str) -> None:
        try:
            await asyncio.to_thread(self.cgroups.set_background, branch_id, False)
        except OSError as e:  # the sandbox went meanwhile
            log.info("double.weight_not_restored", branch=branch_id, error=str(e))

    async def reseed(self, rt: Runtime, index: int) -> None:
        """Clones of one process state share RNG state: tell each child its index
        (/.deltabox/fork-index) and re-seed Python sessions' `random` from os.urandom."""
        await asyncio.to_thread(self.write_fork_index, rt.branch_id, index)
        await self.reseed_sessions(rt)

    def write_fork_index(self, branch_id: str, index: int) -> None:
        """/.deltabox/fork-index of a fork's child (blocking)."""
        SandboxFiles(self.store.mnt_dir / branch_id, 1 << 20).write(
            "/.deltabox/fork-index", f"{index}\n".encode())

    async def seed_ahead(self, sb: Standby) -> None:
        """A warm pool's body double, re-seeded while it waits (thawed, its Python
        sessions' `random` re-seeded, frozen again): a fork that adopts it then only
        writes the child's index (core/fork.py), not a session call per child."""
        await asyncio.to_thread(self.cgroups.thaw, sb.branch_id)
        try:
            await self.reseed_sessions(Runtime(sb.init_pid, sb.branch_id))
        finally:
            await asyncio.to_thread(self.cgroups.freeze, sb.branch_id)

    async def reseed_sessions(self, rt: Runtime) -> None:
        """Re-seed the `random` of each Python session of a running incarnation."""
        for key in (await rt.channel.list_sessions()):
            kind, _, name = key.partition("/")
            if kind == SessionKind.PYTHON:
                await self._sessions.run_locked(rt, kind, name,
                                                "__import__('random').seed()", 10.0)

    async def build_double(self, rec: SandboxRecord, ckpt: CheckpointRecord,
                           what: str, first: Exception | None = None) -> Standby | None:
        """An incarnation of `ckpt` on a fresh branch, left frozen (a body double) for a
        full checkpoint; None if it could not be made (an optimisation only: the
        caller falls back to a restore).

        A full checkpoint whose double fails is tried once more; failing again the
        same way marks it unusable (see `_judge_double_failure`). `first`: a restore
        of it that failed already (one attempt is left). A success clears a mark left
        by another CRIU build."""
        full = ckpt.mode == CheckpointMode.FULL
        if full and self._known_unusable(ckpt):
            return None
        for attempt in (1, 2)[1 if first is not None else 0:]:
            branch_id = new_id("br")
            await asyncio.to_thread(self.store.new_branch_dirs, branch_id, ckpt.mount_layers,
                                    rec.spec)
            mnt = self.store.branch_mount_for(branch_id, ckpt.mount_layers)
            try:
                # The network is attached when (if) the standby is promoted. A full
                # checkpoint's standby is its body double: restored, left frozen.
                launch = self._launch_in_background if full else self._incarnations.launch
                # The attempt after a failed restore logs at debug level: it decides
                # whether the checkpoint is at fault, and its log (kept next to the
                # images when it fails) is the one to read.
                pid, start = await asyncio.to_thread(
                    functools.partial(launch, rec, mnt, False, self.images_for(ckpt), True,
                                      debug_log=full and first is not None))
            except Exception as e:  # noqa: BLE001 - a standby is an optimisation only
                log.warning(f"{what}.failed", sandbox=rec.id or None, checkpoint=ckpt.id,
                            attempt=attempt, error=str(e))
                await asyncio.to_thread(self._incarnations.retire, branch_id, 0)
                if not full or self._ctx.stopping or not criu_own_failure(e):
                    return None
                if first is None:
                    first = e
                    continue
                await asyncio.to_thread(self._judge_double_failure, ckpt, first, e)
                return None
            if ckpt.unusable_reason:
                await asyncio.to_thread(self.store.set_unusable, ckpt.id, "")
                log.info("checkpoint.restorable_again", checkpoint=ckpt.id,
                         criu=self._ctx.criu_build())
            return Standby(branch_id, ckpt.id, pid, start, tuple(ckpt.mount_layers))
        return None

    def _launch_in_background(self, *args, **kw) -> tuple[int, float]:
        """`Incarnations.launch` of a body double, with CRIU at nice BACKGROUND_NICE: it
        inherits this worker thread's nice value (Linux's nice is per thread), so the
        sandboxes' own work and the daemon's replies go first -- but only within one
        cgroup: CRIU runs in the double's cgroup, so that cgroup is weighted like nice
        BACKGROUND_NICE too (`background`), else it competes with each running sandbox as
        an equal (`wake` gives it the default weight). The restored tasks get their own
        nice value and policy back from the images (CRIU restores both), so a double
        that takes over runs as its checkpoint did."""
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)
        try:
            return self._incarnations.launch(*args, background=True, **kw)
        finally:
            os.setpriority(os.PRIO_PROCESS, 0, before)

    # ---- checkpoints that cannot be restored ----------------------------------------
    #
    # A full checkpoint is acknowledged when its dump succeeded, but some process trees
    # dump and then never restore (a CRIU bug, e.g. CRIU issue #2687 before our patch
    # 0002). Building the body double is the first restore: when it fails twice the
    # same way, the checkpoint is marked unusable with CRIU's reason (store: unusable,
    # unusable_criu), shown in CheckpointInfo and the tree, and rollback, fork and warm
    # to it fail at once. The mark names the CRIU build: another build tries again.

    def after_restore_failure(self, rec: SandboxRecord, ckpt: CheckpointRecord,
                              error: BaseException) -> None:
        """A restore of `ckpt` outside a double (a rollback's, a fork's) failed: is the
        checkpoint at fault? Found out in the background."""
        if isinstance(error, CriuError):
            self._ctx.spawn(self._recheck_restore(rec, ckpt, error))

    async def _recheck_restore(self, rec: SandboxRecord, ckpt: CheckpointRecord,
                               error: Exception) -> None:
        """One more restore, on a throwaway branch, tells whether the checkpoint is at
        fault."""
        if ckpt.mode != CheckpointMode.FULL or not criu_own_failure(error) \
                or self._ctx.stopping or self._known_unusable(ckpt):
            return
        async with self._ctx.holds.hold(ckpt.id):
            try:
                ckpt = self.store.get_checkpoint(ckpt.id)
            except NotFound:
                return
            sb = await self.build_double(rec, ckpt, "recheck", first=error)
        if sb is not None:  # it restored this time: a transient failure
            await asyncio.to_thread(self._incarnations.retire, sb.branch_id, sb.init_pid)

    def _known_unusable(self, ckpt: CheckpointRecord) -> bool:
        return bool(ckpt.unusable_reason) and ckpt.unusable_criu == self._ctx.criu_build()

    def refuse_unusable(self, ckpt: CheckpointRecord) -> None:
        """Fail fast, with the reason, instead of a restore that is known to fail."""
        if self._known_unusable(ckpt):
            raise FailedPrecondition(
                f"checkpoint {ckpt.id} cannot be restored: its processes failed to restore "
                f"twice the same way ({ckpt.unusable_reason}); roll back to another "
                "checkpoint")

    def refuse_unusable_now(self, ckpt: CheckpointRecord) -> None:
        """`refuse_unusable` on the stored record: a double may have failed meanwhile."""
        if ckpt.mode == CheckpointMode.FULL:
            self.refuse_unusable(self.store.get_checkpoint(ckpt.id))

    def _judge_double_failure(self, ckpt: CheckpointRecord, first: Exception,
                              second: Exception) -> None:
        """Two restores of the images, on two fresh branches, failed. The same CRIU
        error lines both times (numbers aside: pids, fds) mean the images cannot be
        restored; different ones mean something transient (the host, not the
        checkpoint), which leaves the checkpoint unmarked."""
        # As sets: the restored tasks' restorers log their errors in no fixed order.
        a, b = (sorted(set(comparable(getattr(e, "lines", str(e))).split("; ")))
                for e in (first, second))
        if a != b:
            log.info("checkpoint.double_failure_transient", checkpoint=ckpt.id,
                     first=str(first), second=str(second))
            return
        reason = getattr(second, "lines", str(second))
        self.store.set_unusable(ckpt.id, reason, self._ctx.criu_build())
        log.error("checkpoint.unusable", checkpoint=ckpt.id, sandbox=ckpt.sandbox_id,
                  reason=reason, criu=self._ctx.criu_build())

