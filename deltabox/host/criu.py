"""CRIU driven through its RPC (`criu swrk`), for DeltaCR.

Why the RPC and not libcriu through cffi: a restore must start in the
sandbox's cgroup, so the `criu swrk` process is moved into it before it forks
the tree -- libcriu spawns swrk itself and never exposes its pid; libcriu 4.1.1
cannot call back into Python between "restored" and "resumed", where a body
double freezes its cgroup; and its `criu_check()` crashes on this kernel (the
CLI's `criu check` works). The RPC
is the protocol libcriu speaks anyway -- one `criu_req`/`criu_resp` protobuf
per SOCK_SEQPACKET message on a socketpair given to `criu swrk <fd>` -- with
every option available and no C to maintain. proto/criu/rpc.proto is CRIU's
own (MIT), compiled by native/build.py.

Each call runs one `criu swrk` process and is blocking: callers run it in a
worker thread. Before its first dump or restore it probes the kernel's features
("kerndat", 20-70 ms here, all of it inside a checkpoint's frozen window) unless
its cache file holds them (see KDAT_CACHE): CRIU writes it only when /run is a tmpfs, which
it is not on every host (this project's VMs), so `ensure_kdat_cache` writes it
once per daemon, outside the frozen window (see there). Errors become `CriuError` with the lines of CRIU's log that say
what failed (which process, which resource).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from deltabox._proto.criu import rpc_pb2 as rpc
from deltabox.errors import FailedPrecondition
from deltabox.faults import crash_point, hold_point, holds
from deltabox.host import linux

__all__ = ["Criu", "CriuError", "DumpResult", "Swrk", "find_criu"]

LOG_NAME = "criu.log"
# The sandbox's network namespace is dumped empty and restored empty (CRIU's empty_ns):
# a sandbox has only `lo` (NAT sandboxes, with a veth, are not fully checkpointed), and
# dumping the namespace ran `ip` and `iptables-save` 8 times, about half of a small dump.
# On restore, `lo` is brought up at CRIU's "setup-namespaces" step, before any socket is
# restored. What the sandbox's root configured in its own namespace itself (addresses,
# routes, iptables rules) is not kept.
CLONE_NEWNET = 0x40000000
OWNER_ENV = "DELTABOX_CRIU_OWNER"
# A dump logs errors and warnings only: at debug level (4) CRIU and its parasite write
# ~2,000 lines per dump of a small sandbox, one write() each, with the tree frozen
# (~5 core-ms of a 10 MB dump's ~60). Its error lines, all `_error_lines` quotes, are
# kept. So does a restore (~1,700 lines at level 4, ~2.7 core-ms of ~47 for a demo
# sandbox holding 10 MB; a rollback by restore pays it): only a restore tried again after
# one failed (`debug_log`: the second attempt that judges the checkpoint) logs at debug
# level, and its log is kept next to the images when it fails too.
DUMP_LOG_LEVEL = 2
RESTORE_LOG_LEVEL = 2
DEBUG_LOG_LEVEL = 4
log = structlog.get_logger("deltabox.host.criu")
ORPHAN_GRACE_S = 10.0  # how long an orphaned criu may take to finish on its own
# <owner>.<pid> (holding the helper's start ticks): each running `criu swrk`. Its
# environment's OWNER_ENV tag is not enough: a dump or restore sets its process title
# (libbsd setproctitle), which zeroes the whole original argv + environ area.
HELPERS_DIR = Path("/run/deltabox-criu")
# CRIU's cache of kernel features is $RUNDIR/criu.kdat, RUNDIR fixed at build time: /run
# by default, and OURS for the build native/setup-host.sh makes. Each build has its own
# magic (the build's time), so builds sharing one file delete each other's cache as stale
# and probe again, inside a checkpoint's frozen window (40-100 ms): a host's distro CRIU
# (Docker's, Podman's) must not share ours.
KDAT_CACHE = Path("/run/criu.kdat")
KDAT_CACHE_OURS = Path("/run/deltabox-kdat/criu.kdat")
KDAT_MAX_WRITES = 3  # another CRIU build finds ours stale and deletes it: stop rewriting

# Files a process holds open after they were deleted or replaced (`mv new old`, `git
# checkout`, `pip install -U` over a loaded .so) are dumped as "ghost files": CRIU
# copies their content into the images and recreates them, unlinked, on restore. On
# overlayfs a deleted lower file cannot be hard-linked back (link-remap), so CRIU
# falls back to a ghost (it needs the link_remap option to try). Every dump copies
# each such file whole (~1 GB/s here), so the copy is bounded: a bigger one refuses
# the checkpoint, naming the process and the file.
GHOST_LIMIT = 512 << 20


class CriuError(FailedPrecondition):
    """A dump or restore failed; the message quotes CRIU's own error lines.

    `lines`: those lines alone; `timed_out`: criu was killed after its timeout
    (a loaded host, not necessarily a property of the images)."""

    def __init__(self, message: str, lines: str = "", timed_out: bool = False):
        super().__init__(message)
        self.lines = lines or message
        self.timed_out = timed_out


@dataclass
class DumpResult:
    ms: float
    image_bytes: int


def _start_ticks(pid: int) -> int:
    """The start time of a live (not zombie) process, in clock ticks since boot; 0 if
    there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return 0 if fields[0] in ("Z", "X") else int(fields[19])


def find_criu(prefix: Path | None = None) -> Path | None:
    """CRIU under `prefix` (the daemon passes its criu-prefix setting; other callers get
    $DELTABOX_CRIU_PREFIX or /opt/deltabox/criu), else /usr/local/sbin/criu."""
    from deltabox.config import DEFAULT_CRIU_PREFIX
    if prefix is None:
        prefix = Path(os.environ.get("DELTABOX_CRIU_PREFIX") or DEFAULT_CRIU_PREFIX)
    for candidate in (prefix / "sbin" / "criu", Path("/usr/local/sbin/criu")):
        if candidate.exists():
            return candidate
    return None


# Error lines CRIU prints on every run here, which explain nothing.
_NOISE = ("RLIMIT_NOFILE", "Dumping FAILED", "Restoring FAILED",
          # kerndat probes (tun, ip address add) a sandbox without those rights fails
          "Unable to create tun", "ipv4: Address already assigned",
          "ipv6: address already assigned")


def _sandbox_pid(host_pid: int) -> str:
    """'pid N (comm)' as the sandbox sees it (NSpid's last field)."""
    try:
        status = Path(f"/proc/{host_pid}/status").read_text()
        comm = Path(f"/proc/{host_pid}/comm").read_text().strip()
    except OSError:
        return f"host pid {host_pid}"
    nspid = next((ln.split()[-1] for ln in status.splitlines() if ln.startswith("NSpid:")),
                 str(host_pid))
    return f"pid {nspid} ({comm})"


def _fd_kinds(host_pid: int) -> str:
    """The unusual fds of a process (anon inodes, sockets), to name the resource."""
    kinds = set()
    try:
        for fd in Path(f"/proc/{host_pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(("anon_inode:", "socket:")):
                kinds.add(target.split(":")[0] if target.startswith("socket:")
                          else target.split(":", 1)[1])
    except OSError:
        pass
    return ", ".join(sorted(kinds))


def _family_name(m: re.Match) -> str:
    try:
        return f"(family {m.group(1)}: {socket.AddressFamily(int(m.group(1))).name})"
    except ValueError:
        return m.group(0)


def _holders(path: str, pids: list[int]) -> list[str]:
    """The processes among `pids` that hold `path` (deleted) open or mapped."""
    found = []
    for pid in pids:
        for sub in ("fd", "map_files"):
            try:
                links = [os.readlink(e) for e in os.scandir(f"/proc/{pid}/{sub}")]
            except OSError:
                continue
            if any(t == path or t == f"{path} (deleted)" for t in links):
                found.append(_sandbox_pid(pid))
                break
    return found


# CRIU's words for what it cannot do, and ours (docs/deltacr.md, "What cannot be
# checkpointed"): put first in the error, before CRIU's own lines.
_EXPLAIN = (
    (r"fsnotify: .*Can't dump that handle|Can't dump that handle",
     "an inotify or fanotify watch on the sandbox's files cannot be checkpointed "
     "(overlayfs gives CRIU no file handle to find the watched file by)"),
    (r"Can't lookup mount=\d+ for fd=\d+ path=/",
     "an open file on a mount the sandbox's tree does not show, e.g. a POSIX message "
     "queue (mq_open), cannot be checkpointed"),
)


_TIMED = re.compile(r"^\(\s*\d+\.\d+\)\s*")
# pr_err / pr_warn: "Error (file:line): ", "Warn  (file:line): " (the restorer's: "pie: N: ...")
_TIMED_ERROR_OR_WARNING = re.compile(r"^\(\s*\d+\.\d+\)\s*(pie: \d+: )?(Error|Warn)\s+\(")


def _error_lines(log: Path, limit: int = 6, pids: list[int] = (),
                 ghost_limit: int = GHOST_LIMIT) -> str:
    """What a failed CRIU call says went wrong: its 'Error' lines without the
    noise, and for "Dump files (pid: N)" the process as the sandbox sees it, and
    for a deleted file too big to copy the processes that hold it (among `pids`)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no CRIU log)"
    # At debug level every line of CRIU's own is timestamped, and its debug and info
    # lines may name an error they handled: only the lines level 2 (RESTORE_LOG_LEVEL)
    # also writes -- errors, warnings, untimed ones -- count, so that a restore logged at
    # debug level after one that was not says the same (`DeltaCR._judge_double_failure`).
    all_lines = text.strip().splitlines()
    logged = [ln for ln in all_lines
              if not _TIMED.match(ln) or _TIMED_ERROR_OR_WARNING.match(ln)]
    lines: list[str] = []
    why: list[str] = []
    for line in logged:
        if "Error" not in line or any(n in line for n in _NOISE):
            continue
        why += [text for pattern, text in _EXPLAIN if re.search(pattern, line)
                and text not in why]
        msg = re.sub(r"^\(\s*\d+\.\d+\)\s*", "", line).strip()
        msg = re.sub(r"\(family (\d+)\)", _family_name, msg)
        m = re.search(r"\(pid: (\d+)\)", msg)
        if m:
            pid = int(m.group(1))
            kinds = _fd_kinds(pid)
            msg += f" [{_sandbox_pid(pid)}" + (f", holds {kinds}" if kinds else "") + "]"
        m = re.search(r"Can't dump ghost file (.+) of (\d+) size", msg)
        if m:
            who = _holders("/" + m.group(1).lstrip("/"), pids)
            msg = (f"/{m.group(1).lstrip('/')} was deleted or replaced while "
                   f"{', '.join(who) or 'a process'} holds it open; its {int(m.group(2))} "
                   f"bytes exceed the {ghost_limit >> 20} MiB a checkpoint copies of such "
                   "files: close it (or restart the process) first")
        if msg not in lines:
            lines.append(msg)
    if lines:
        return "; ".join(why + lines[:limit])
    tail = logged or all_lines
    return _TIMED.sub("", tail[-1]).strip() if tail else "(empty CRIU log)"


@contextlib.contextmanager
def _dir_fd(path: Path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@dataclass
class Swrk:
    """One running `criu swrk`: its process, our end of its socket, its HELPERS_DIR mark."""
    proc: subprocess.Popen
    sock: socket.socket
    mark: Path | None
    running: set[int] | None = None  # its Criu's `helper_pids`

    def kill(self) -> None:
        """SIGKILL criu and the helpers it forked (stopped first, so that it forks no
        more while they are listed): a helper left running would hold criu's end of the
        socket open, and the call reading it would wait for an answer that never comes.
        The helpers become the daemon's children (a subreaper): `Incarnations.reap`."""
        def send(sig: int) -> None:
            self.proc.send_signal(sig)  # polls first: a reaped criu is not signalled
            if self.proc.returncode is not None:  # nor its pid, maybe reused, walked
                raise ProcessLookupError
        linux.kill_tree(self.proc.pid, send)

    def close(self) -> None:
        """Hang up and reap it (one never asked ends at once: its socket is closed)."""
        self.sock.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.running is not None:
            self.running.discard(self.proc.pid)
        if self.mark is not None:
            self.mark.unlink(missing_ok=True)


class Criu:
    def __init__(self, binary: Path, ghost_limit: int = GHOST_LIMIT, owner: str = ""):
        self.binary = binary
        self.ghost_limit = ghost_limit
        self._build_id: str | None = None
        # Each `criu swrk` carries OWNER_ENV=owner (the store's instance id): a daemon
        # killed mid-call leaves it running, and the next start finds it by that.
        self.owner = owner
        # Run before `criu swrk` (argv prefix), e.g. deltabox-init --exec-memory-merged:
        # the trees it restores inherit the KSM mark (deltabox.host.ksm).
        self.exec_prefix: list[str] = []
        self._kdat_lock = threading.Lock()
        self._swrks_running: set[int] = set()  # see helper_pids
        self._kdat_writes = 0
        self.kdat_cache: Path | None = None  # where this build reads it (found by the probe)

    def ensure_kdat_cache(self) -> None:
        """Have this build's kdat cache (KDAT_CACHE_OURS for our build, KDAT_CACHE for
        others) hold its probe of this kernel, so that a dump does not probe it while
        the sandbox is frozen. Called at daemon start-up (reconcile) and before each
        full checkpoint's freeze (then a no-op while the file is there).

        CRIU saves the probe only when the cache's directory is a tmpfs (emptied at
        boot, so never stale after a kernel upgrade). Where it is not, `criu check` runs
        in a private mount namespace with a tmpfs on /run, and the cache it writes --
        whichever of the two paths the build uses -- is copied to the same path on the
        host; CRIU itself then loads it (it checks only its own magic and size). The
        first call of each daemon rewrites it -- a file left from before a reboot may
        describe another kernel; a file another CRIU build deleted as stale is written
        again, a few times at most. Best effort: CRIU probes when it is missing, as it
        always did."""
        with self._kdat_lock:
            if self._kdat_writes and self.kdat_cache and self.kdat_cache.exists() \
                    or self._kdat_writes >= KDAT_MAX_WRITES:
                return
            self._kdat_writes += 1
            try:
                res = subprocess.run(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                     'mount -t tmpfs -o size=1m,mode=0755 none /run && mkdir -m 0700 "$1" && '
                     '"$0" check >/dev/null 2>&1; for f in "$1/criu.kdat" /run/criu.kdat; do '
                     '[ -s "$f" ] && { echo "$f"; exec cat "$f"; }; done; exit 1',
                     str(self.binary), str(KDAT_CACHE_OURS.parent)],
                    capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
                path, _, data = res.stdout.partition(b"\n")
                if res.returncode != 0 or not data:
                    raise OSError(f"criu check wrote no cache: "
                                  f"{res.stderr.decode(errors='replace')[-300:]}")
                cache = Path(path.decode())
                cache.parent.mkdir(mode=0o700, exist_ok=True)
                tmp = cache.with_name(f".criu.kdat.deltabox-{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(tmp, cache)
                self.kdat_cache = cache
                log.info("criu.kdat_cached", path=str(cache), size=len(data))
            except (OSError, subprocess.SubprocessError) as e:
                self._kdat_writes = KDAT_MAX_WRITES  # CRIU probes for itself, as before
                log.warning("criu.kdat_not_cached", error=str(e))

    def build_id(self) -> str:
        """This CRIU: version and the fingerprint of the patch set it was built with
        (native/setup-host.sh). A checkpoint one build cannot restore may restore
        with another. Read once: the daemon runs one build."""
        if self._build_id is None:
            patches = self.binary.resolve().parent.parent / ".deltabox-patches"
            try:
                fingerprint = patches.read_text().strip()[:12]
            except OSError:
                fingerprint = "unknown"
            self._build_id = f"{self.version()}+{fingerprint}"
        return self._build_id

    def orphans(self) -> list[int]:
        """Pids of the CRIU helpers of this owner (`criu swrk`, and a restore's forks
        before they become the restored tasks). Called at start-up, before this
        daemon runs CRIU: they are a killed daemon's. Identified by the binary's
        inode (a sandbox cannot run the host's criu) and the owner tag."""
        if not self.owner:
            return []
        try:
            st = os.stat(self.binary)
        except OSError:
            return []
        tag = f"{OWNER_ENV}={self.owner}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                exe = os.stat(proc / "exe")
                if (exe.st_dev, exe.st_ino) != (st.st_dev, st.st_ino):
                    continue
                if tag in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
        for mark in self._marks():  # the helpers whose title has wiped the tag
            try:
                pid, ticks = int(mark.suffix[1:]), int(mark.read_text())
                exe = os.stat(f"/proc/{pid}/exe")
                ours = (exe.st_dev, exe.st_ino) == (st.st_dev, st.st_ino)
            except (OSError, ValueError):
                pid, ours = 0, False
            if ours and ticks and _start_ticks(pid) == ticks:
                if pid not in found:
                    found.append(pid)
            else:
                mark.unlink(missing_ok=True)
        return found

    def _marks(self) -> list[Path]:
        try:
            return list(HELPERS_DIR.glob(f"{self.owner}.*")) if self.owner else []
        except OSError:
            return []

    def _mark(self, pid: int) -> Path | None:
        """Record a running helper of this owner (see HELPERS_DIR); best effort."""
        if not self.owner:
            return None
        mark = HELPERS_DIR / f"{self.owner}.{pid}"
        try:
            HELPERS_DIR.mkdir(exist_ok=True)
            mark.write_text(str(_start_ticks(pid)))
            return mark
        except OSError:
            return None

    def end_orphans(self, grace: float = ORPHAN_GRACE_S) -> int:
        """Let the helpers a killed daemon left (`orphans`) finish, for up to `grace`
        seconds -- a dump killed midway may leave its parasite code in a process --
        then SIGKILL the rest; returns how many there were."""
        found = {pid: _start_ticks(pid) for pid in self.orphans()}
        if not found:
            return 0
        log.warning("criu.orphans", pids=sorted(found))

        def alive() -> list[int]:
            return [p for p, t in found.items() if t and _start_ticks(p) == t]
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in alive():
            log.error("criu.orphan_killed", pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.orphans()  # drops the marks of the ended ones
        return len(found)

    def version(self) -> str:
        res = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True)
        m = re.search(r"Version:\s*(\S+)", res.stdout)
        return m.group(1) if m else res.stdout.strip()

    def start_swrk(self) -> Swrk:
        """A fresh `criu swrk`, waiting for its request. A dump's caller starts it before
        freezing the sandbox: the exec and CRIU's start-up (2-10 ms, more under load)
        then stay out of the frozen window. Give it to one call, or `close` it."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = {**os.environ, OWNER_ENV: self.owner} if self.owner else None
            proc = subprocess.Popen([*self.exec_prefix, str(self.binary), "swrk",
                                     str(child.fileno())], env=env,
                                    pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    cwd="/")
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._swrks_running.add(proc.pid)
        return Swrk(proc, parent, self._mark(proc.pid), self._swrks_running)

    def helper_pids(self) -> set[int]:
        """The `criu swrk` processes started and not yet reaped (by `Swrk.close`): any
        other zombie child of the daemon named criu is a restore's fork that was killed
        before it became the restored task (a failed or aborted restore), which only the
        daemon can reap (`Incarnations.reap`)."""
        return set(self._swrks_running)

    def _call(self, req: rpc.criu_req, log: Path, enter=None,
              on_notify=None, timeout: float = 120.0, fault: str = "",
              swrk: Swrk | None = None) -> rpc.criu_resp:
        """One request to a fresh `criu swrk` (`swrk`, if one was started already).
        `enter(criu_pid)`, if given, runs before the request (see `restore`); if it
        raises, criu is killed unasked. `on_notify(script, criu_pid, pid)` runs for each
        of CRIU's notifications (with notify_scripts) before CRIU goes on. A call that
        takes longer than `timeout` kills criu and fails (CRIU can hang in the kernel,
        e.g. attaching to a stopped task in a frozen cgroup)."""
        swrk = swrk or self.start_swrk()
        proc, parent = swrk.proc, swrk.sock
        parent.settimeout(timeout)
        try:
            if enter is not None:
                try:
                    enter(proc.pid)
                except BaseException:
                    swrk.kill()  # not asked anything; it may be stopped: not waited for
                    raise
            parent.sendall(req.SerializeToString())
            if fault:
                crash_point(fault)
            while True:
                try:
                    data = parent.recv(1 << 20)
                except socket.timeout:
                    swrk.kill()
                    raise CriuError(f"criu did not finish within {timeout:.0f} s and was "
                                    f"killed: {_error_lines(log)}", timed_out=True) from None
                if not data:
                    raise CriuError(f"criu exited without answering: "
                                    f"{proc.stderr.read().decode(errors='replace')[-500:]}"
                                    f" {_error_lines(log)}")
                resp = rpc.criu_resp()
                resp.ParseFromString(data)
                if resp.type == rpc.NOTIFY:
                    ok = True
                    if on_notify is not None:
                        try:
                            on_notify(resp.notify.script, proc.pid, resp.notify.pid)
                        except Exception:  # noqa: BLE001 - CRIU then fails the call
                            ok = False
                    parent.sendall(rpc.criu_req(type=rpc.NOTIFY,
                                                notify_success=ok).SerializeToString())
                    continue
                return resp
        finally:
            swrk.close()

    def _opts(self, images_fd: int, log_name: str, log_level: int, **kw) -> rpc.criu_opts:
        # CRIU finds the images dir through /proc/<our pid>/fd/<images_fd> (its
        # `images_dir` string option is readlink()ed and fails on a plain path).
        return rpc.criu_opts(images_dir_fd=images_fd, log_file=log_name, log_level=log_level,
                             tcp_established=True, file_locks=True, network_lock=rpc.SKIP,
                             **kw)

    @staticmethod
    def _frozen_pids(freeze_cgroup: Path | None) -> list[int]:
        try:
            return [int(p) for p in (freeze_cgroup / "cgroup.procs").read_text().split()]
        except (OSError, TypeError, ValueError):
            return []

    def dump(self, pid: int, images_dir: Path, root: Path, freeze_cgroup: Path | None,
             leave_running: bool = True, swrk: Swrk | None = None) -> DumpResult:
        """Dump the process tree of `pid` (a sandbox's init) into `images_dir`.

        The sandbox's root is the branch mount `root`, declared external so CRIU
        does not try to dump it (DeltaFS sinks it). `freeze_cgroup`: the tree's
        freezer cgroup, already frozen by the caller (one cut for files and
        processes). `swrk`: a `criu swrk` started before the freeze (`start_swrk`)."""
        t0 = time.perf_counter()
        # A crash test holds the dump midway (deltabox.faults): CRIU has written the
        # images and holds the tree seized, waiting for our answer to "post-dump".
        held = holds("checkpoint.post-dump")

        def on_notify(script: str, criu_pid: int, pid: int) -> None:
            if script == "post-dump":
                hold_point("checkpoint.post-dump")
        with _dir_fd(images_dir) as fd:
            opts = self._opts(fd, LOG_NAME, DUMP_LOG_LEVEL, pid=pid, root=str(root),
                              leave_running=leave_running, external=["mnt[/]:root"],
                              empty_ns=CLONE_NEWNET,
                              freeze_cgroup=str(freeze_cgroup) if freeze_cgroup else None,
                              manage_cgroups_mode=rpc.IGNORE,
                              link_remap=True, ghost_limit=self.ghost_limit,
                              notify_scripts=held)
            resp = self._call(rpc.criu_req(type=rpc.DUMP, opts=opts), images_dir / LOG_NAME,
                              on_notify=on_notify if held else None, fault="checkpoint.dump",
                              swrk=swrk)
        if not resp.success:
            lines = _error_lines(images_dir / LOG_NAME, pids=self._frozen_pids(freeze_cgroup),
                                 ghost_limit=self.ghost_limit)
            raise CriuError(f"CRIU dump of pid {pid} failed (errno {resp.cr_errno}): {lines}",
                            lines)
        size = sum(p.stat().st_size for p in images_dir.iterdir()
                   if p.is_file() and p.suffix == ".img")
        return DumpResult(1000 * (time.perf_counter() - t0), size)

    def restore(self, images_dir: Path, root: Path, enter,
                freeze=None, debug_log: bool = False) -> int:
        """Restore the tree in `images_dir` onto the branch mounted at `root`; returns
        the host pid of its init. The tree starts as a sibling of criu (a child of the
        daemon) in the cgroups that `enter(criu_pid)` puts criu in before it is asked:
        criu forks the restored tree, so every restored process starts (and is charged)
        there. `enter` raising (the sandbox was torn down meanwhile) fails the restore.

        `freeze(criu_pid)`, if given, runs at CRIU's "pre-resume" notification: a
        body double moves criu out of the sandbox's cgroup (criu must keep running)
        and freezes the cgroup, so the restored tasks stop before returning to
        their code and run only when a rollback thaws them -- unlike CRIU's
        leave_stopped, no SIGSTOP/SIGCONT is ever seen by them.

        The tree's root is the daemon's child: if the restore fails after CRIU forked it
        (CRIU kills the tree, or a teardown aborts it), no pid is returned, yet its
        zombie is the daemon's to reap (`helper_pids`, `Incarnations.reap`).

        CRIU logs errors and warnings (RESTORE_LOG_LEVEL), or everything with
        `debug_log`; either way a failure's log stays in `images_dir`."""
        self.ensure_kdat_cache()
        # Many restores of one image may run at once (fork): one log each.
        log_name = f"restore-{Path(root).name}.log"

        ours: list[BaseException] = []

        def on_notify(script: str, criu_pid: int, pid: int) -> None:
            try:
                if script == "setup-namespaces":
                    from deltabox.host.network import loopback_up
                    loopback_up(pid)  # the namespace is restored empty: see CLONE_NEWNET
                elif script == "pre-resume":
                    hold_point("restore.pre-resume")
                    if freeze is not None:
                        freeze(criu_pid)
            except BaseException as e:
                ours.append(e)
                raise
        with _dir_fd(images_dir) as fd:
            opts = self._opts(fd, log_name, DEBUG_LOG_LEVEL if debug_log else RESTORE_LOG_LEVEL,
                              root=str(root), rst_sibling=True,
                              external=[f"mnt[root]:{root}"], manage_cgroups_mode=rpc.IGNORE,
                              empty_ns=CLONE_NEWNET, notify_scripts=True)
            resp = self._call(rpc.criu_req(type=rpc.RESTORE, opts=opts),
                              images_dir / log_name, enter, on_notify)
        if not resp.success:
            if ours:  # our freeze failed, not CRIU's restore
                raise ours[0]
            lines = _error_lines(images_dir / log_name)
            raise CriuError(f"CRIU restore from {images_dir.name} failed (errno "
                            f"{resp.cr_errno}): {lines}", lines)
        (images_dir / log_name).unlink(missing_ok=True)
        return resp.restore.pid
