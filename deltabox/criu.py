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
worker thread. Errors become `CriuError` with the lines of CRIU's log that say
what failed (which process, which resource).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deltabox._proto.criu import rpc_pb2 as rpc
from deltabox.errors import FailedPrecondition

__all__ = ["Criu", "CriuError", "DumpResult", "find_criu"]

LOG_NAME = "criu.log"


class CriuError(FailedPrecondition):
    """A dump or restore failed; the message quotes CRIU's own error lines."""


@dataclass
class DumpResult:
    ms: float
    image_bytes: int


def find_criu() -> Path | None:
    from deltabox.config import CRIU_PREFIX
    for candidate in (CRIU_PREFIX / "sbin" / "criu", Path("/usr/local/sbin/criu")):
        if candidate.exists():
            return candidate
    return None


# Error lines CRIU prints on every run here, which explain nothing.
_NOISE = ("RLIMIT_NOFILE", "Dumping FAILED", "Restoring FAILED")


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


def _error_lines(log: Path, limit: int = 6) -> str:
    """What a failed CRIU call says went wrong: its 'Error' lines without the
    noise, and for "Dump files (pid: N)" the process as the sandbox sees it."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no CRIU log)"
    lines: list[str] = []
    for line in text.splitlines():
        if "Error" not in line or any(n in line for n in _NOISE):
            continue
        msg = re.sub(r"^\(\s*\d+\.\d+\)\s*", "", line).strip()
        msg = re.sub(r"\(family (\d+)\)", _family_name, msg)
        m = re.search(r"\(pid: (\d+)\)", msg)
        if m:
            pid = int(m.group(1))
            kinds = _fd_kinds(pid)
            msg += f" [{_sandbox_pid(pid)}" + (f", holds {kinds}" if kinds else "") + "]"
        if msg not in lines:
            lines.append(msg)
    if lines:
        return "; ".join(lines[:limit])
    tail = text.strip().splitlines()
    return tail[-1] if tail else "(empty CRIU log)"


@contextlib.contextmanager
def _dir_fd(path: Path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


class Criu:
    def __init__(self, binary: Path):
        self.binary = binary

    def version(self) -> str:
        res = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True)
        m = re.search(r"Version:\s*(\S+)", res.stdout)
        return m.group(1) if m else res.stdout.strip()

    def _call(self, req: rpc.criu_req, log: Path, join_cgroups: list[Path] = (),
              on_notify=None, timeout: float = 120.0) -> rpc.criu_resp:
        """One request to a fresh `criu swrk`. `on_notify(script)` runs for each of
        CRIU's notifications (with notify_scripts) before CRIU goes on. A call that
        takes longer than `timeout` kills criu and fails (CRIU can hang in the
        kernel, e.g. attaching to a stopped task in a frozen cgroup)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent.settimeout(timeout)
        proc = None
        try:
            proc = subprocess.Popen([str(self.binary), "swrk", str(child.fileno())],
                                    pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    cwd="/")
            child.close()
            # A restored tree is forked by criu: put criu in the sandbox's cgroups
            # first, so every restored process starts (and is charged) there.
            for procs in join_cgroups:
                with open(procs, "w") as f:
                    f.write(str(proc.pid))
            parent.sendall(req.SerializeToString())
            while True:
                try:
                    data = parent.recv(1 << 20)
                except socket.timeout:
                    proc.kill()
                    raise CriuError(f"criu did not finish within {timeout:.0f} s and was "
                                    f"killed: {_error_lines(log)}") from None
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
                            on_notify(resp.notify.script, proc.pid)
                        except Exception:  # noqa: BLE001 - CRIU then fails the call
                            ok = False
                    parent.sendall(rpc.criu_req(type=rpc.NOTIFY,
                                                notify_success=ok).SerializeToString())
                    continue
                return resp
        finally:
            parent.close()
            child.close()
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _opts(self, images_fd: int, log_name: str, **kw) -> rpc.criu_opts:
        # CRIU finds the images dir through /proc/<our pid>/fd/<images_fd> (its
        # `images_dir` string option is readlink()ed and fails on a plain path).
        return rpc.criu_opts(images_dir_fd=images_fd, log_file=log_name, log_level=4,
                             tcp_established=True, file_locks=True, network_lock=rpc.SKIP,
                             **kw)

    def dump(self, pid: int, images_dir: Path, root: Path, freeze_cgroup: Path | None,
             leave_running: bool = True) -> DumpResult:
        """Dump the process tree of `pid` (a sandbox's init) into `images_dir`.

        The sandbox's root is the branch mount `root`, declared external so CRIU
        does not try to dump it (DeltaFS sinks it). `freeze_cgroup`: the tree's
        freezer cgroup, already frozen by the caller (one cut for files and
        processes)."""
        t0 = time.perf_counter()
        with _dir_fd(images_dir) as fd:
            opts = self._opts(fd, LOG_NAME, pid=pid, root=str(root),
                              leave_running=leave_running, external=["mnt[/]:root"],
                              freeze_cgroup=str(freeze_cgroup) if freeze_cgroup else None,
                              manage_cgroups_mode=rpc.IGNORE)
            resp = self._call(rpc.criu_req(type=rpc.DUMP, opts=opts), images_dir / LOG_NAME)
        if not resp.success:
            raise CriuError(f"CRIU dump of pid {pid} failed (errno {resp.cr_errno}): "
                            f"{_error_lines(images_dir / LOG_NAME)}")
        size = sum(p.stat().st_size for p in images_dir.iterdir()
                   if p.is_file() and p.suffix == ".img")
        return DumpResult(1000 * (time.perf_counter() - t0), size)

    def restore(self, images_dir: Path, root: Path, cgroup_procs: list[Path],
                freeze=None) -> int:
        """Restore the tree in `images_dir` onto the branch mounted at `root`; returns
        the host pid of its init. The tree starts in `cgroup_procs`' cgroups, as a
        sibling of criu (a child of the daemon).

        `freeze(criu_pid)`, if given, runs at CRIU's "pre-resume" notification: a
        body double moves criu out of the sandbox's cgroup (criu must keep running)
        and freezes the cgroup, so the restored tasks stop before returning to
        their code and run only when a rollback thaws them -- unlike CRIU's
        leave_stopped, no SIGSTOP/SIGCONT is ever seen by them."""
        # Many restores of one image may run at once (fork): one log each.
        log_name = f"restore-{Path(root).name}.log"

        def on_notify(script: str, criu_pid: int) -> None:
            if script == "pre-resume" and freeze is not None:
                freeze(criu_pid)
        with _dir_fd(images_dir) as fd:
            opts = self._opts(fd, log_name, root=str(root), rst_sibling=True,
                              external=[f"mnt[root]:{root}"], manage_cgroups_mode=rpc.IGNORE,
                              notify_scripts=freeze is not None)
            resp = self._call(rpc.criu_req(type=rpc.RESTORE, opts=opts),
                              images_dir / log_name, cgroup_procs, on_notify)
        if not resp.success:
            raise CriuError(f"CRIU restore from {images_dir.name} failed (errno "
                            f"{resp.cr_errno}): {_error_lines(images_dir / log_name)}")
        (images_dir / log_name).unlink(missing_ok=True)
        return resp.restore.pid


# ---- keeping full dumps small -------------------------------------------------------------
#
# Without soft-dirty tracking (not in this kernel) every dump writes all pages again.
# Most of them are the same as in the previous checkpoint, at the same offset of the
# same pages-N.img (CRIU writes pages in VMA order). FIDEDUPERANGE asks XFS to share
# such ranges: the kernel compares the bytes and shares the extents only if equal.

FIDEDUPERANGE = 0xC0189436
_DEDUPE_HDR = struct.Struct("=QQHHI")
_DEDUPE_INFO = struct.Struct("=qQQiI")
DEDUPE_CHUNK = 1 << 20


def _dedupe(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    buf = bytearray(_DEDUPE_HDR.pack(offset, length, 1, 0, 0)
                    + _DEDUPE_INFO.pack(dst_fd, offset, 0, 0, 0))
    fcntl.ioctl(src_fd, FIDEDUPERANGE, buf)
    _, _, deduped, status, _ = _DEDUPE_INFO.unpack_from(buf, _DEDUPE_HDR.size)
    return deduped if status == 0 else 0


def dedupe_pages(parent_dir: Path, new_dir: Path) -> int:
    """Share identical 1 MiB ranges of new_dir's page images with parent_dir's;
    returns the bytes now shared."""
    shared = 0
    for new in sorted(new_dir.glob("pages-*.img")):
        old = parent_dir / new.name
        if not old.exists():
            continue
        with open(old, "rb") as fo, open(new, "rb+") as fn:
            size = min(os.fstat(fo.fileno()).st_size, os.fstat(fn.fileno()).st_size)
            for off in range(0, size - size % 4096, DEDUPE_CHUNK):
                length = min(DEDUPE_CHUNK, size - off) // 4096 * 4096
                try:
                    shared += _dedupe(fo.fileno(), fn.fileno(), off, length)
                except OSError:
                    return shared  # not XFS/btrfs, or a range the kernel refuses
    return shared
