"""Incarnations: a branch mounted, a cgroup, and an init (fresh, or restored by CRIU).

A sandbox's processes live in one incarnation at a time; a rollback builds a new one next
to the old before switching, a standby or a warm pool holds spare ones. This module starts
them (`Incarnations.launch`: mount + cgroup + init or restore, the network attached), tears
them down (`kill`, `retire`), reaps their inits, and identifies processes by (pid, start
time) -- a pid alone may be reused. `cpu_activity` tells whether an incarnation's processes
ran since an earlier frozen instant (an unchanged sandbox is not checkpointed twice).

With the `ksm` setting on (deltabox.host.ksm), every incarnation is marked for memory
merging: a fresh one through its init (`--memory-merge yes`), a restored one through the
criu that forks it (`deltabox-init --exec-memory-merged criu swrk`), so doubles of related
states share their identical pages once ksmd has seen them.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import structlog

from deltabox.config import init_binary
from deltabox.core.files import SandboxFiles
from deltabox.core.runtime import SandboxContext
from deltabox.errors import FailedPrecondition, Internal
from deltabox.host import ksm, linux
from deltabox.host.cgroups import Limits
from deltabox.store.records import Mount, SandboxRecord
from deltabox.types import NetworkMode

__all__ = ["Incarnations", "process_start", "same_process", "alive", "kill_quiet",
           "cpu_activity"]

log = structlog.get_logger("deltabox.core.incarnation")

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# After a failed restore, reaps look for its tree's root (once a second) this long: CRIU
# may end the tree after the call failed.
ORPHAN_SWEEP_S = 5.0


def process_start(pid: int) -> float:
    """When `pid` started, in seconds since boot (0.0 if it is gone): with the pid, the
    identity of a sandbox's init. Not wall-clock time: that is derived from the boot
    time the kernel reports, which moves whenever the clock is stepped, and an init
    that no longer matches its record would be restarted (its sessions lost)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19]) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def same_process(pid: int, recorded_start: float) -> bool:
    """Is `pid` the process recorded with `recorded_start`? Records written before
    start times were boot-relative hold wall-clock times (> 1e9): those compare, to
    the second, with the wall-clock start (the boot time may have moved since)."""
    if not pid:
        return False
    if recorded_start < 1e9:
        return process_start(pid) == recorded_start
    try:
        return abs(psutil.Process(pid).create_time() - recorded_start) < 2.0
    except psutil.Error:
        return False


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is our (subreaped) zombie
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cpu_activity(pids: list[int], init_pid: int) -> tuple | None:
    """What an incarnation's processes have run, read while its cgroup is frozen: equal at
    two frozen instants means no process started, ended or used a clock tick of CPU in
    between. None if a process vanished while it was read.

    Per thread: its id, its start time, and its user + system time; per process the time
    of the children it reaped (a short command exits within the interval, but its time
    goes to whoever reaped it). The init's own time is left out: it serves the daemon (a
    checkpoint's barrier, queries), and each freeze and thaw charges every task a few
    microseconds of kernel time -- so the kernel's tick-granular times are compared, not
    the exact runtime (schedstat), which a freeze alone moves. A burst shorter than a tick
    by a process already running may go unseen; a new process, an exec'd command and any
    call from the daemon (counted apart, see runtime.DumpGate.calls) never do."""
    out = []
    for pid in sorted(pids):
        try:
            tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
            for tid in tids:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                own = () if pid == init_pid else (int(fields[11]), int(fields[12]))
                out.append((pid, tid, int(fields[19]), own, int(fields[13]), int(fields[14])))
        except (OSError, IndexError, ValueError):
            return None
    return tuple(out)


def kill_quiet(pid: int) -> None:
    """SIGKILL a sandbox's init: the kernel then kills its whole pid namespace."""
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Incarnations:
    """Starts and ends incarnations; blocking (call it from a worker thread).

    Teardown of one incarnation happens once at a time and in order: several paths may
    end the same branch concurrently -- a destroy, the daemon's shutdown (its stray
    sweep), a retire spawned by a rollback or a dropped standby, a worker thread left
    running by a call cancelled at shutdown -- and two of them killing and removing one
    cgroup at once made one read a cgroup file mid-removal (ENODEV: the shutdown crash of
    test_graceful_stop_with_a_stopped_sandbox). A per-branch lock orders them (the second
    finds the incarnation gone), and a branch once ended is never launched again: a
    launch still in flight when its branch is killed (a call cancelled during a CRIU
    restore) is refused or undone, not left running unowned."""

    def __init__(self, ctx: SandboxContext) -> None:
        self.store = ctx.store
        self.cgroups = ctx.cgroups
        self._ctx = ctx  # for CRIU, found once by the manager
        self._to_reap: set[int] = set()  # killed inits not yet waited for
        # Until when reaps also look for a failed restore's root, and the next look.
        self._sweep_until = self._next_sweep = 0.0
        self._branch_locks: dict[str, list] = {}  # branch -> [RLock, users]
        self._branch_locks_guard = threading.Lock()
        # Branches ended while this daemon runs (bounded: only a launch racing its own
        # teardown looks, and that launch started moments ago).
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        # CRIU restores in flight: branch -> sandbox id ('' for a warm pool's), what
        # `abort_restores` ends; and, once a body double's criu has moved out of the
        # branch's cgroup (pre-resume), a pidfd of it, which a kill signals too.
        self._restoring: dict[str, str] = {}
        # (Both read and written under the branch's teardown lock.)
        self._restorers: dict[str, tuple[int, int]] = {}  # branch -> (pidfd, pid)
        # Decided once, at start-up: `ksm = on` turns the host's ksmd on here.
        self.memory_merge = ksm.decide(ctx.config.ksm, ctx.config.ksm_pages_to_scan)
        if self.memory_merge and ctx.criu is not None:
            ctx.criu.exec_prefix = [str(init_binary()), "--exec-memory-merged"]

    def launch(self, rec: SandboxRecord, mnt: Mount, network: bool = True,
               restore_from: Path | None = None, stopped: bool = False,
               background: bool = False, debug_log: bool = False) -> tuple[int, float]:
        """Mount a branch, create its cgroup, start the sandbox; (pid, start time).

        It starts with a fresh init, or -- `restore_from` a checkpoint's process
        images (DeltaCR) -- with the checkpoint's processes, left stopped if
        `stopped` (a body double). The cgroup is named after the branch: every
        rollback makes a new branch, so an incarnation being torn down never
        shares a cgroup with its successor.

        `background` (a body double built ahead): the cgroup weighs like a task at nice
        BACKGROUND_NICE, so the CRIU restore in it yields to the running sandboxes;
        `DeltaCR.wake` gives it the default weight when it takes over. `debug_log`: CRIU
        logs at debug level (a restore tried again after one failed).
        """
        branch_id = Path(mnt.target).name
        # Set up under the branch's teardown lock: a kill either came first (refused
        # here) or waits for the mount and cgroup and then ends what runs in them --
        # an init or a CRIU restore in flight (criu and every restored task are in the
        # cgroup until pre-resume; criu enters it under the lock too, so a kill is
        # before its entry, refused, or after it, killing it), which then fails. An
        # init joining as the kill looks is killed by `kill_and_remove`.
        with self._teardown(branch_id):
            self._refuse_ended(branch_id)
            Path(mnt.target).mkdir(exist_ok=True)
            if not linux.is_mountpoint(mnt.target):
                mnt.mount()
            limits = Limits(rec.spec["memory_bytes"], rec.spec["pids"], rec.spec["cpus"])
            procs = self.cgroups.create(branch_id, limits)
            if background:
                self.cgroups.set_background(branch_id, True)
            if restore_from is not None:
                self._restoring[branch_id] = rec.id
        try:
            pid, start = self._start(rec, mnt, branch_id, procs, network, restore_from,
                                     stopped, debug_log)
        except BaseException:
            self._refuse_ended(branch_id)  # ended under it: say so, not how it broke
            raise
        finally:
            self._restoring.pop(branch_id, None)
            with self._teardown(branch_id):  # not while a kill signals through it
                restorer = self._restorers.pop(branch_id, None)
                if restorer is not None:
                    os.close(restorer[0])
        with self._teardown(branch_id):
            if branch_id in self._ended:  # ended after its processes started: undone
                self.kill(branch_id, pid)
                self._refuse_ended(branch_id)
        return pid, start

    def _start(self, rec: SandboxRecord, mnt: Mount, branch_id: str, procs: list[Path],
               network: bool, restore_from: Path | None, stopped: bool,
               debug_log: bool = False) -> tuple[int, float]:
        """The processes of a launch, in its mounted branch and created cgroup."""
        if restore_from is not None:
            def freeze(criu_pid: int) -> None:  # see Criu.restore: a frozen body double
                # Ordered with a kill of the branch, as `enter`: a kill before it is
                # refused here (CRIU then fails the restore); one after it finds criu,
                # out of the cgroup now, in `_restorers`.
                with self._teardown(branch_id):
                    self._refuse_ended(branch_id)
                    self._restorers[branch_id] = (os.pidfd_open(criu_pid), criu_pid)
                    self.cgroups.move_to_own_cgroups(criu_pid)
                    self.cgroups.freeze(branch_id)
            def enter(criu_pid: int) -> None:  # ordered with a kill of the branch
                with self._teardown(branch_id):
                    self._refuse_ended(branch_id)
                    if self._ctx.stopping:  # registered in _restoring before this check:
                        raise FailedPrecondition("the daemon is stopping")  # see shutdown
                    self.cgroups.enter(procs, criu_pid)
            try:
                pid = self._ctx.require_criu().restore(restore_from, Path(mnt.target),
                                                       enter, freeze if stopped else None,
                                                       debug_log)
            except BaseException:
                # The tree's root is the daemon's child (CRIU's rst_sibling), its pid
                # never returned: killed by CRIU or by an abort, it is ours to reap --
                # now, and by the monitor's reaps for a few seconds (it may die later).
                self.reap_orphans_soon()
                raise
            # Its network namespace is restored with `lo` only (deltabox.host.criu): a NAT
            # sandbox's veth is attached as to a fresh init (a body double's on promotion).
            if network and rec.spec.get("network") == NetworkMode.NAT:
                self.attach_network(rec, pid, Path(mnt.target))
            return pid, process_start(pid)
        argv = [str(init_binary()), "--rootfs", mnt.target, "--hostname", rec.spec["hostname"]]
        for p in procs:
            argv += ["--cgroup-procs", str(p)]
        if self.memory_merge:
            argv += ["--memory-merge", "yes"]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise Internal(f"starting the sandbox's init failed: {res.stderr.strip()}")
        pid = int(res.stdout.split()[0])
        if network and rec.spec.get("network") == NetworkMode.NAT:
            self.attach_network(rec, pid, Path(mnt.target))
        return pid, process_start(pid)

    def attach_network(self, rec: SandboxRecord, pid: int, root: Path) -> None:
        from deltabox.host import network as net
        net.attach_nat(rec.id, pid, rec.spec["net_index"])
        servers = net.host_nameservers()
        if servers:
            SandboxFiles(root, 1 << 20).write(
                "/etc/resolv.conf", "".join(f"nameserver {s}\n" for s in servers).encode())

    @contextlib.contextmanager
    def _teardown(self, branch_id: str):
        """Hold the branch's lock (re-entrant: retire calls kill)."""
        with self._branch_locks_guard:
            entry = self._branch_locks.setdefault(branch_id, [threading.RLock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._branch_locks_guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._branch_locks[branch_id]

    def _refuse_ended(self, branch_id: str) -> None:
        if branch_id in self._ended:
            raise FailedPrecondition(f"the sandbox incarnation {branch_id} was torn down "
                                     "while it was being started (destroyed, or the daemon "
                                     "is stopping)")

    def kill(self, branch_id: str, init_pid: int, rec: SandboxRecord | None = None) -> None:
        """Kill an incarnation's processes, remove its cgroup, unmount its branch.
        Idempotent, and ordered with any other teardown (or launch) of the branch."""
        with self._teardown(branch_id):
            self._ended[branch_id] = None
            while len(self._ended) > 4096:
                self._ended.popitem(last=False)
            self._kill(branch_id, init_pid, rec)

    def abort_restores(self, sandbox_id: str | None = None) -> int:
        """End the CRIU restores in flight (of one sandbox, or all): body doubles being
        built, a rollback's restore that lost its race, a warm pool's. Their branches are
        killed, so the launches fail at once (FailedPrecondition: ended) instead of being
        waited for: a destroy or a shutdown does not wait behind a restore, nor behind one
        that hangs until CRIU's timeout. How many were ended."""
        ended = [b for b, s in list(self._restoring.items())
                 if sandbox_id is None or s == sandbox_id]
        for branch_id in ended:
            self.kill(branch_id, 0)
        return len(ended)

    def _kill(self, branch_id: str, init_pid: int, rec: SandboxRecord | None) -> None:
        restorer = self._restorers.get(branch_id)
        if restorer is not None:  # criu, out of the cgroup: killed with its helpers
            pidfd, pid = restorer
            linux.kill_tree(pid, functools.partial(signal.pidfd_send_signal, pidfd))
        self.cgroups.kill_and_remove(branch_id)
        if init_pid:
            # The daemon is a subreaper (and restores are its children): the
            # killed init is ours to reap, once it has exited -- see reap().
            self._to_reap.add(init_pid)
            self.reap()
        if rec is not None and rec.spec.get("network") == NetworkMode.NAT \
                and rec.branch_id == branch_id:
            from deltabox.host import network as net
            net.detach_nat(rec.id)
        for m in linux.mounts_under(self.store.mnt_dir / branch_id):
            try:
                linux.umount(m)
            except OSError:
                linux.umount(m, linux.MNT_DETACH)

    def retire(self, branch_id: str, init_pid: int) -> None:
        """Tear down a branch that no record refers to any more, and delete it."""
        with self._teardown(branch_id):
            self.kill(branch_id, init_pid)
            self.store.delete_branch_dirs(branch_id)

    def reap(self) -> None:
        """waitpid() the killed inits that have exited (never -1: that would steal
        the exit status of the daemon's other children, e.g. a launcher's); after a
        restore failed, also the roots of restored trees that died with no pid returned."""
        for pid in list(self._to_reap):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child, or already reaped
                done = pid
            if done:
                self._to_reap.discard(pid)
        now = time.monotonic()
        if self._next_sweep <= now < self._sweep_until:
            self._next_sweep = now + 1.0
            self._reap_orphaned_roots()

    def reap_orphans_soon(self) -> None:
        """A CRIU call failed or was aborted: reap what it leaves the daemon (a
        subreaper) -- a restored tree's root, CRIU's helpers -- now and, as they may end
        later, at the reaps of the next few seconds."""
        self._sweep_until = time.monotonic() + ORPHAN_SWEEP_S
        self._next_sweep = 0.0
        self.reap()

    def _reap_orphaned_roots(self) -> None:
        """The daemon's zombie children that a failed CRIU call left: a restored tree's
        root that was a pid namespace's init (killed after CRIU made the namespace), or
        processes still named criu that are no `criu swrk` of ours (a restore's fork
        killed before it became the restored task, a helper of a killed criu). A `criu
        check` run ending just then could be taken too: it would read exit status 0,
        and its caller checks what it wrote, not its status."""
        criu = self._ctx.criu
        helpers = criu.helper_pids() if criu is not None else set()
        for pid in linux.zombie_children():
            name, ns_depth = linux.process_name_and_ns_depth(pid)
            if ns_depth > 1 or (name == "criu" and pid not in helpers):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
