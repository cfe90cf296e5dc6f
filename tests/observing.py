"""What the kernel says about a daemon's sandboxes, for checking the daemon's word.

A test that only trusts what the daemon reports (a rollback's path, a fork's count)
passes when the daemon is wrong; these read the processes themselves: the inits in
the cgroups of a daemon's store, their freezer state, their pid namespaces.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from conftest import freezer_state, sandbox_inits


def doubles(state_dir: Path) -> set[int]:
    """Host pids of the inits of body doubles (restored, frozen) of a daemon's store."""
    return {p for p in sandbox_inits(state_dir) if freezer_state(p) == "FROZEN"}


def live_init(state_dir: Path, sbx) -> int:
    """Host pid of the sandbox's init now, found by its pid namespace: the one the
    sandbox's processes see as their pid 1 (not what the daemon says it is)."""
    ns = sbx.exec(["readlink", "/proc/self/ns/pid"]).check().stdout.decode().strip()
    found = []
    for pid in sandbox_inits(state_dir):
        try:
            # (a child the init forked is named deltabox-init too until it execs)
            if os.readlink(f"/proc/{pid}/ns/pid") == ns and _ns_pid(pid) == 1:
                found.append(pid)
        except OSError:
            pass
    assert len(found) == 1, f"no single init in {ns}: {found}"
    return found[0]


def _ns_pid(pid: int) -> int:
    """The process's pid in its own (innermost) pid namespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return 0


def cgroup_of(pid: int, controller: str = "pids") -> str:
    """The last component of the process's cgroup (a sandbox's branch id); v1 or v2."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(",") or ctrls == "":
            return path.rstrip("/").rsplit("/", 1)[-1]
    return ""


def children_named(pid: int, name: str, recursive: bool = False) -> list[int]:
    """Pids of `pid`'s children called `name` (e.g. a daemon's `criu` runs). A child that
    exits while we look is simply not one of them: it does not hide the others."""
    try:
        kids = psutil.Process(pid).children(recursive=recursive)
    except psutil.Error:
        return []
    found = []
    for p in kids:
        try:
            if p.name() == name:
                found.append(p.pid)
        except (psutil.Error, OSError):   # gone meanwhile (psutil may leak the OSError)
            pass
    return found
