"""The one throw-away daemon: tests, `deltabox demo` and `deltabox bench` all use it.

A `ThrowawayDaemon` is a real `deltabox daemon` subprocess (as root) on its own state
dir -- a loop-backed XFS store, its own socket, its own log file -- started, waited for
until it answers `Status`, stopped, and cleaned up after. Nothing is mocked: its
sandboxes are real namespaces, cgroups and overlay mounts.

API
---
    from deltabox.testing import ThrowawayDaemon

    with ThrowawayDaemon() as d:            # a fresh temp dir; removed on exit
        with d.client() as c:
            c.status()

    d = ThrowawayDaemon(state_dir, store_size="16G", image_dirs=(...,), extra_args=(...))
    d.start(timeout=30)   # -> d, once Status answers; RuntimeError with the log's tail if not
    d.client()            # a deltabox.Client on its socket (the caller closes it)
    d.cli("ls")           # `deltabox --socket S ls` as a subprocess (CompletedProcess)
    d.stop(timeout=30)    # SIGTERM and wait: the graceful path; returns the exit status
    d.kill()              # SIGKILL: a crash (sandboxes, mounts, loop device stay behind)
    d.cleanup()           # stop if running, then kill leftover sandbox inits, remove their
                          # cgroups, unmount what is left under the state dir; returns what it
                          # had to do ('' when the daemon left nothing); removes the temp dir
                          # if the daemon made it
    d.log()               # the last 5,000 characters of the daemon's log
    d.proc, d.pid, d.socket, d.state_dir, d.log_path
    d.instance            # the store's instance id (names its cgroups), read once ready

Accounting: `ThrowawayDaemon(..., accounting=True)` starts the daemon in a cgroup of its
own (v1: the cpuacct hierarchy, which sandboxes never leave; v2: a leaf cgroup beside the
daemon's sandbox cgroups), so `d.cpu_seconds()` is the CPU time of the daemon, its CRIU
runs and every process of its sandboxes -- the machine's other work is not in it.

`image_dirs` replaces the daemon's default image dirs (--image-dir, repeated).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import deltabox
from deltabox.host import linux
from deltabox.host.cgroups import CGROUP_ROOT, PARENT, detect_driver, instance_processes
from deltabox.store.metadata import read_instance_id

__all__ = ["ThrowawayDaemon", "DAEMON_COMMAND"]

# How the daemon is started: the CLI module of this interpreter's deltabox.
DAEMON_COMMAND = (sys.executable, "-m", "deltabox.cli")


class ThrowawayDaemon:
    """A `deltabox daemon` subprocess with its own state dir, socket and log."""

    def __init__(self, state_dir: Path | None = None, *, store_size: str = "16G",
                 image_dirs: tuple[Path, ...] = (), extra_args: tuple = (),
                 accounting: bool = False):
        self._owns_dir = state_dir is None
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="deltabox-daemon-")) / "state"
        self.state_dir = Path(state_dir)
        self.socket = self.state_dir / "deltabox.sock"
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"
        self.store_size = store_size
        self.image_dirs = tuple(image_dirs)
        self.extra_args = tuple(extra_args)
        self.accounting = accounting
        self.proc: subprocess.Popen | None = None
        self.instance: str | None = None
        self._acct: Path | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30) -> "ThrowawayDaemon":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        dirs = [arg for d in self.image_dirs for arg in ("--image-dir", str(d))]
        preexec = None
        if self.accounting:
            self._acct = _accounting_cgroup(f"deltabox-testing-{os.getpid()}-"
                                            f"{self.state_dir.parent.name}")
            procs = self._acct / "cgroup.procs"
            preexec = lambda: procs.write_text("0")  # noqa: E731 - joins before exec
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*DAEMON_COMMAND, "daemon", "--state-dir", str(self.state_dir), "--socket",
                 str(self.socket), "--store-size", self.store_size, *dirs, *self.extra_args],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, preexec_fn=preexec)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists():
                try:
                    with self.client() as c:
                        c.status()
                    self.instance = read_instance_id(self.state_dir)
                    return self
                except deltabox.DeltaboxError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> deltabox.Client:
        return deltabox.Client(self.socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash. Sandboxes, mounts and the loop device stay behind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def cli(self, *args: str, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*DAEMON_COMMAND, "--socket", str(self.socket), *args],
                              capture_output=True, input=input, timeout=timeout)

    def cleanup(self) -> str:
        """Stop the daemon if it runs, then remove what it left in the kernel: sandbox
        inits of its store (killed), their cgroups, mounts under the state dir. Returns
        what had to be done ('' if nothing). Removes the temp dir if it made it."""
        if self.running():
            try:
                self.stop(60)
            except subprocess.TimeoutExpired:
                self.kill()
        left = remove_leftovers(self.state_dir, self.instance)
        if self._acct is not None:
            _remove_cgroup(self._acct)
            self._acct = None
        if self._owns_dir:
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.state_dir.parent)],
                           check=False)
        return left

    def __enter__(self) -> "ThrowawayDaemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- accounting ---------------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the daemon, its CRIU runs and all its sandboxes'
        processes (needs accounting=True)."""
        if self._acct is None:
            raise RuntimeError("start the daemon with accounting=True")
        # Sandboxes leave the daemon's cgroup where the daemon moves them (v2; v1 where
        # cpuacct is mounted with cpu): add the store instance's cgroup, if it exists.
        inst = self._acct.parent / PARENT / self.instance if self.instance else None
        if self._acct.parent == CGROUP_ROOT / "cpuacct":
            ns = _read_int(self._acct / "cpuacct.usage")
            return (ns + (_read_int(inst / "cpuacct.usage") if inst else 0)) / 1e9
        usec = _usage_usec(self._acct) + (_usage_usec(inst) if inst else 0)
        return usec / 1e6


def remove_leftovers(state_dir: Path, instance: str | None) -> str:
    """Kill what runs in the sandbox cgroups of store `instance`, remove those cgroups
    (through `deltabox.host.cgroups`' driver) and unmount what is left under
    `state_dir`, after its daemon stopped or crashed. Returns what was done, '' if the
    daemon had left nothing."""
    killed = removed = 0
    if instance:
        inits = len(instance_processes(instance, "deltabox-init"))
        driver = detect_driver(instance)
        for name in sorted(driver.names()):
            try:
                driver.kill_and_remove(name)
                removed += 1
            except (OSError, TimeoutError):
                continue
        driver.release_parents()
        killed = inits
    mounts = sorted(linux.mounts_under(state_dir), key=len, reverse=True)
    for m in mounts:
        subprocess.run(["umount", m], capture_output=True)
        if linux.is_mountpoint(m):
            subprocess.run(["umount", "-l", m], capture_output=True)
    branch_mounts = [m for m in mounts if not m.endswith("/store")]
    if not killed and not removed and not branch_mounts:
        return ""
    return (f"killed {killed} sandbox init(s), removed {removed} cgroup(s), "
            f"unmounted {len(branch_mounts)} branch mount(s)")


def _remove_cgroup(path: Path) -> int:
    for _ in range(50):
        try:
            path.rmdir()
            return 1
        except FileNotFoundError:
            return 0
        except OSError:  # still emptying
            time.sleep(0.02)
    return 0


def _accounting_cgroup(name: str) -> Path:
    """A fresh cgroup that counts CPU time: v1 cpuacct (sandbox processes stay in it:
    the daemon moves them through memory, pids, cpu, freezer and devices only), or a v2
    leaf."""
    v1 = CGROUP_ROOT / "cpuacct"
    if (v1 / "cpuacct.usage").exists():
        path = v1 / name
    elif (CGROUP_ROOT / "cgroup.controllers").exists():
        path = CGROUP_ROOT / name
    else:
        raise RuntimeError("no cgroup hierarchy to account CPU time in (cpuacct or cgroup2)")
    path.mkdir(exist_ok=True)
    return path


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _usage_usec(cgroup: Path) -> int:
    try:
        for line in (cgroup / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

