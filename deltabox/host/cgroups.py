"""Per-sandbox cgroups: limits, freezing, membership and clean-up.

Two backends behind one interface, chosen once at start-up:
- v2 (unified hierarchy with the memory controller, e.g. Ubuntu 24.04):
  /sys/fs/cgroup/deltabox/<store-instance>/<sandbox-id>
- v1 (hybrid hosts such as this project's VMs, where memory/pids/cpu/freezer/devices
  are v1 hierarchies): /sys/fs/cgroup/<controller>/deltabox/<store-instance>/<sandbox-id>.

Every sandbox cgroup gets the device allow-list DEVICE_ALLOW: through devices.deny /
devices.allow on v1, through a BPF_PROG_TYPE_CGROUP_DEVICE program on v2 (which has no
devices files). Without it a device node that reaches a sandbox's tree (its /dev is a
tmpfs without nodev) would give raw access to, say, the host's disk.

<store-instance> is a random id kept in the store's database, so daemons on
different state dirs never touch (or "reconcile away") each other's sandboxes.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from deltabox.host import linux

__all__ = ["Limits", "CgroupDriver", "detect_driver", "DeviceRule", "DEVICE_ALLOW",
           "attach_device_filter", "BACKGROUND_NICE", "NICE_TO_WEIGHT"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "deltabox"


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids: int
    cpus: float  # 0 = unlimited


@dataclass(frozen=True)
class DeviceRule:
    """One devices.allow entry: `kind` "c" or "b", major/minor None for any,
    `access` letters from "rwm" (read, write, mknod)."""
    kind: str
    major: int | None
    minor: int | None
    access: str

    def v1_line(self) -> str:
        """The rule as cgroup v1's devices.allow (and devices.list) spells it."""
        def num(n):
            return "*" if n is None else str(n)
        return f"{self.kind} {num(self.major)}:{num(self.minor)} {self.access}"


# Docker's default device list; everything else is denied. Left out of Docker's:
# c 5:1 (/dev/console: the host's console, which the init does not create) and
# c 10:200 (/dev/net/tun: sandboxes have no CAP_NET_ADMIN to configure a tun device).
DEVICE_ALLOW: tuple[DeviceRule, ...] = (
    DeviceRule("c", None, None, "m"),  # mknod of any node (opening it is another matter)
    DeviceRule("b", None, None, "m"),
    DeviceRule("c", 1, 3, "rwm"),      # /dev/null
    DeviceRule("c", 1, 5, "rwm"),      # /dev/zero
    DeviceRule("c", 1, 7, "rwm"),      # /dev/full
    DeviceRule("c", 1, 8, "rwm"),      # /dev/random
    DeviceRule("c", 1, 9, "rwm"),      # /dev/urandom
    DeviceRule("c", 5, 0, "rwm"),      # /dev/tty
    DeviceRule("c", 5, 2, "rwm"),      # /dev/ptmx (each devpts instance's pts/ptmx)
    DeviceRule("c", 136, None, "rwm"),  # /dev/pts/*
)


def _device_rule_tuples(rules: tuple[DeviceRule, ...]) -> list[tuple]:
    return [(r.kind, r.major, r.minor, r.access) for r in rules]


def attach_device_filter(cgroup_dir: Path, rules: tuple[DeviceRule, ...] = DEVICE_ALLOW) -> None:
    """Allow the tasks of the cgroup v2 directory `cgroup_dir` only `rules`'
    devices (a BPF program; replaces the one attached before)."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        linux.attach_device_filter(fd, _device_rule_tuples(rules))
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _wait_until(done, what: str, timeout: float = 5.0) -> None:
    """Poll `done()`: yield the CPU between polls at first (freezing usually
    settles within ~100 us, less than a sleep costs; a busy spin would take a core
    from the very tasks being frozen), then back off."""
    start = time.monotonic()
    while not done():
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise TimeoutError(what)
        if elapsed > 0.002:
            time.sleep(0.0005)
        else:
            os.sched_yield()


# Cgroup directories a driver keeps as Path objects (see `_cached_dir`), before it starts
# over.
_DIR_CACHE = 4096

# Reading a file of a cgroup that is gone, or being removed (its kernfs node already
# deactivated: ENODEV, seen while another thread rmdirs it), means "no such cgroup".
_GONE = (errno.ENOENT, errno.ENODEV)


def _procs(path: str | Path) -> list[int]:
    """The pids in a cgroup.procs file; none when the cgroup is gone or going."""
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except OSError as e:
        if e.errno not in _GONE:
            raise
        return []


def _read_int(path: Path) -> int:
    """An integer cgroup file; 0 when the cgroup is gone or going."""
    try:
        return int(path.read_text())
    except ValueError:
        return 0
    except OSError as e:
        if e.errno not in _GONE:
            raise
        return 0


def _rmdir_retry(path: Path, timeout: float = 5.0) -> None:
    """rmdir a cgroup; it stays busy for a moment after its last task exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


# CRIU restoring a body double runs at this nice value (deltabox.core.deltacr), and the
# double's cgroup weighs like a task at it (`CgroupDriver.set_background`).
BACKGROUND_NICE = 10

# The kernel's weight of a task at nice -20 .. 19 (kernel/sched/core.c sched_prio_to_weight);
# nice 0 is 1024, a v1 cgroup's default cpu.shares.
NICE_TO_WEIGHT = (88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916,
                  9548, 7620, 6100, 4904, 3906, 3121, 2501, 1991, 1586, 1277,
                  1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
                  110, 87, 70, 56, 45, 36, 29, 23, 18, 15)


class CgroupDriver:
    version: int
    instance: str
    _dirs: dict[tuple[str, str | None], Path]

    def _cached_dir(self, controller: str, name: str | None) -> Path:
        """CGROUP_ROOT/<controller>/deltabox/<instance>[/<name>] (v2: controller ''),
        memoized: pathlib's joins were a tenth of the daemon's CPU with 32 busy sandboxes
        (85,000 calls in two minutes: every freeze, read and kill)."""
        d = self._dirs.get((controller, name))
        if d is None:
            if len(self._dirs) > _DIR_CACHE:
                self._dirs.clear()
            base = CGROUP_ROOT / controller / PARENT / self.instance
            d = self._dirs[(controller, name)] = base if name is None else base / name
        return d

    def create(self, name: str, limits: Limits) -> list[Path]:
        """Create the cgroup(s); return the cgroup.procs files a process joins through."""
        raise NotImplementedError

    def pids(self, name: str) -> list[int]:
        raise NotImplementedError

    def can_freeze(self, name: str) -> bool:
        return True

    def freezer_path(self, name: str) -> Path:
        """The cgroup CRIU's --freeze-cgroup takes."""
        raise NotImplementedError

    def memory_usage(self, name: str) -> int:
        """Bytes charged to the cgroup (0 if it is gone)."""
        raise NotImplementedError

    def move_to_own_cgroups(self, pid: int) -> None:
        """Move `pid` into the cgroups of this (daemon) process, out of a sandbox's."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers.startswith("name="):
                continue
            if controllers == "":  # the unified hierarchy
                base = CGROUP_ROOT if self.version == 2 else CGROUP_ROOT / "unified"
            else:
                base = CGROUP_ROOT / controllers.split(",")[0]
            procs = base / path.lstrip("/") / "cgroup.procs"
            if procs.exists():
                try:
                    _write(procs, str(pid))
                except OSError:
                    pass  # e.g. a v2 inner node: the process stays where it is

    def set_background(self, name: str, background: bool) -> None:
        """Weigh the cgroup like a task at nice BACKGROUND_NICE (a body double being
        built, and the criu building it), or give it back the default weight (nice 0,
        a sandbox's). A task's nice value orders it only among the tasks of its own
        cgroup; against another sandbox's cgroup the cgroups' weights count
        (docs/deltacr.md, "After a restore: running at full speed")."""
        nice = BACKGROUND_NICE if background else 0
        if self.version == 2:  # the kernel converts it (nice 0 = cpu.weight 100)
            _write(self._dir(name) / "cpu.weight.nice", str(nice))
        else:
            _write(self._dir("cpu", name) / "cpu.shares", str(NICE_TO_WEIGHT[nice + 20]))

    def freeze(self, name: str) -> None:
        raise NotImplementedError

    def thaw(self, name: str) -> None:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Remove the cgroup(s). Callers kill the processes first."""
        raise NotImplementedError

    def names(self) -> set[str]:
        """Every sandbox cgroup that exists (for start-up reconciliation)."""
        raise NotImplementedError

    def memory_events(self, name: str) -> dict[str, int]:
        raise NotImplementedError

    def release_parents(self) -> None:
        """Remove this instance's (empty) parent cgroups, e.g. at shutdown."""
        raise NotImplementedError

    def enter(self, procs: list[Path], pid: int) -> None:
        """Move `pid` into a sandbox's cgroups (their cgroup.procs files, from `create`)."""
        for path in procs:
            _write(path, str(pid))

    def kill_and_remove(self, name: str, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and remove it -- killing again a process
        that joined meanwhile (a launch racing its teardown: an init or a criu that
        wrote itself into cgroup.procs after the kill looked) rather than failing EBUSY."""
        deadline = time.monotonic() + timeout
        while True:
            self.kill_all(name, timeout)
            try:
                self.remove(name)
                return
            except OSError as e:
                if e.errno != errno.EBUSY or not self.pids(name) \
                        or time.monotonic() > deadline:
                    raise

    def kill_all(self, name: str, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty.

        A cgroup removed meanwhile (by another teardown) is empty: done."""
        try:
            self._kill_all(name, timeout)
        except OSError as e:
            if e.errno not in _GONE or name in self.names():
                raise

    def _kill_all(self, name: str, timeout: float) -> None:
        if not self.pids(name):
            # Nothing runs in it (or it is gone): nothing to kill, and no freeze needed
            # -- an empty cgroup has no task left to fork into it. Usual for a rollback's
            # old tree, SIGKILLed when the reply left. (`names()` lists every sandbox's
            # cgroup: O(sandboxes) per call.)
            return
        if not self.can_freeze(name):  # a half-removed cgroup: plain SIGKILLs
            for pid in self.pids(name):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            return
        deadline = time.monotonic() + timeout
        self.freeze(name)  # no forking while we kill
        try:
            while True:
                pids = self.pids(name)
                if not pids:
                    return
                for pid in pids:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
                self.thaw(name)  # frozen tasks die only once thawed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cgroup {name}: processes {pids} survive SIGKILL")
                time.sleep(0.002)
                self.freeze(name)
        finally:
            self.thaw(name)


class CgroupV1(CgroupDriver):
    version = 1
    CONTROLLERS = ("memory", "pids", "cpu", "freezer", "devices")

    def __init__(self, instance: str):
        self.instance = instance
        self._dirs: dict[tuple[str, str | None], Path] = {}

    def _dir(self, controller: str, name: str | None = None) -> Path:
        return self._cached_dir(controller, name)

    def create(self, name, limits):
        procs = []
        for c in self.CONTROLLERS:
            d = self._dir(c, name)
            d.mkdir(parents=True, exist_ok=True)
            procs.append(d / "cgroup.procs")
        mem = self._dir("memory", name)
        _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
        try:  # no swap here, but keep a swapping host from escaping the limit
            _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        except OSError:
            pass
        _write(self._dir("pids", name) / "pids.max", str(limits.pids))
        cpu = self._dir("cpu", name)
        if limits.cpus > 0:
            _write(cpu / "cpu.cfs_period_us", "100000")
            _write(cpu / "cpu.cfs_quota_us", str(int(limits.cpus * 100000)))
        devices = self._dir("devices", name)
        _write(devices / "devices.deny", "a")  # empties the list: deny by default
        for rule in DEVICE_ALLOW:
            _write(devices / "devices.allow", rule.v1_line())
        return procs

    def pids(self, name):
        found: set[int] = set()
        for c in self.CONTROLLERS:  # any of them: a stray may lack some
            found.update(_procs(f"{self._dir(c, name)}/cgroup.procs"))
        return sorted(found)

    def can_freeze(self, name):
        return (self._dir("freezer", name) / "freezer.state").exists()

    def freezer_path(self, name):
        return self._dir("freezer", name)

    def memory_usage(self, name):
        return _read_int(self._dir("memory", name) / "memory.usage_in_bytes")

    def _freezer_state(self, name: str, state: str) -> None:
        path = self._dir("freezer", name) / "freezer.state"
        _write(path, state)
        _wait_until(lambda: path.read_text().strip() == state,
                    f"cgroup {name}: freezer stuck before {state}")

    def freeze(self, name):
        self._freezer_state(name, "FROZEN")

    def thaw(self, name):
        # v1 thaws synchronously (freezer_change_state wakes every task before the write
        # returns; freezer.state reads THAWED at once): no poll -- it is on the hot paths
        # of a rollback to a body double and of a checkpoint's frozen window (issue 10).
        _write(self._dir("freezer", name) / "freezer.state", "THAWED")

    def remove(self, name):
        for c in self.CONTROLLERS:
            _rmdir_retry(self._dir(c, name))

    def names(self):
        found: set[str] = set()
        for c in self.CONTROLLERS:
            d = self._dir(c)
            if d.is_dir():
                found.update(p.name for p in d.iterdir() if p.is_dir())
        return found

    def memory_events(self, name):
        d = self._dir("memory", name)
        return {"max": int((d / "memory.failcnt").read_text()),
                "oom_kill": _kv(d / "memory.oom_control").get("oom_kill", 0)}

    def ensure_parents(self) -> None:
        for c in self.CONTROLLERS:
            self._dir(c).mkdir(parents=True, exist_ok=True)

    def release_parents(self) -> None:
        for c in self.CONTROLLERS:
            try:
                self._dir(c).rmdir()
            except OSError:
                pass


class CgroupV2(CgroupDriver):
    version = 2

    def __init__(self, instance: str):
        self.instance = instance
        self._dirs = {}

    def _dir(self, name: str | None = None) -> Path:
        return self._cached_dir("", name)

    def ensure_parents(self) -> None:
        self._dir().mkdir(parents=True, exist_ok=True)
        for d in (CGROUP_ROOT, CGROUP_ROOT / PARENT, self._dir()):
            _write(d / "cgroup.subtree_control", "+memory +pids +cpu")

    def create(self, name, limits):
        d = self._dir(name)
        d.mkdir(exist_ok=True)
        _write(d / "memory.max", str(limits.memory_bytes))
        _write(d / "memory.swap.max", "0") if (d / "memory.swap.max").exists() else None
        _write(d / "pids.max", str(limits.pids))
        if limits.cpus > 0:
            _write(d / "cpu.max", f"{int(limits.cpus * 100000)} 100000")
        attach_device_filter(d)
        return [d / "cgroup.procs"]

    def pids(self, name):
        return _procs(self._dir(name) / "cgroup.procs")

    def _freeze(self, name: str, value: str) -> None:
        d = self._dir(name)
        _write(d / "cgroup.freeze", value)
        want = "frozen 1" if value == "1" else "frozen 0"
        _wait_until(lambda: want in (d / "cgroup.events").read_text(),
                    f"cgroup {name}: freeze={value} did not settle")

    def freeze(self, name):
        self._freeze(name, "1")

    def thaw(self, name):
        self._freeze(name, "0")

    def release_parents(self) -> None:
        try:
            self._dir().rmdir()
        except OSError:
            pass

    def freezer_path(self, name):
        return self._dir(name)

    def memory_usage(self, name):
        return _read_int(self._dir(name) / "memory.current")

    def _kill_all(self, name, timeout):
        d = self._dir(name)
        if not d.exists():
            return
        _write(d / "cgroup.kill", "1")
        deadline = time.monotonic() + timeout
        while self.pids(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cgroup {name}: processes survive cgroup.kill")
            time.sleep(0.002)

    def remove(self, name):
        _rmdir_retry(self._dir(name))

    def names(self):
        d = self._dir()
        return {p.name for p in d.iterdir() if p.is_dir()} if d.is_dir() else set()

    def memory_events(self, name):
        return _kv(self._dir(name) / "memory.events")


def _kv(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def detect_driver(instance: str) -> CgroupDriver:
    """v2 when the unified hierarchy at /sys/fs/cgroup offers memory, else v1."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        driver: CgroupDriver = CgroupV2(instance)
        # Refuse to start (rather than fail every create) where the kernel cannot
        # load the device filter: no CONFIG_CGROUP_BPF, or no CAP_BPF/CAP_SYS_ADMIN.
        os.close(linux.load_device_filter(_device_rule_tuples(DEVICE_ALLOW)))
    elif all((CGROUP_ROOT / c).is_dir() for c in CgroupV1.CONTROLLERS):
        driver = CgroupV1(instance)
    else:
        raise RuntimeError("no usable cgroup hierarchy: need cgroup2 with memory, "
                           "or v1 " + "+".join(CgroupV1.CONTROLLERS))
    driver.ensure_parents()
    return driver


def instance_processes(instance: str, comm: str | None = None) -> list[int]:
    """Pids in any sandbox cgroup of store `instance` (named `comm`, if given): what
    a store's sandboxes run, found without the store (e.g. after its daemon died)."""
    marker = f"/{PARENT}/{instance}/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if comm is not None and (proc / "comm").read_text().strip() != comm:
                continue
            if marker in (proc / "cgroup").read_text():
                found.append(int(proc.name))
        except OSError:
            pass
    return found
