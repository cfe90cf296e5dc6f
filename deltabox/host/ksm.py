"""KSM (kernel samepage merging) for sandboxes and their body doubles.

Doubles of one checkpoint, and of related checkpoints, hold mostly the same pages. KSM lets
the kernel's `ksmd` thread merge identical anonymous pages into one copy-on-write page. It
only looks at memory marked mergeable: the sandbox's init marks its whole tree with
`prctl(PR_SET_MEMORY_MERGE)` (`deltabox-init --memory-merge yes`; the mark is inherited
across fork and kept across execve), and the daemon starts `criu swrk` through
`deltabox-init --exec-memory-merged` so the trees CRIU restores -- forked from criu --
carry it too (images dumped from a marked tree also record each area as MADV_MERGEABLE,
which CRIU re-applies).

This module owns the host side: whether KSM can be used (`HAS_KSM`), the one decision of
the `ksm` setting (`decide`: off | on | auto), turning ksmd on with a scan rate for `on`,
and reading what was merged (`process_stat`, `read_state`, `ksmd_cpu_seconds`) for tests
and benches. KSM is host-wide: `on` changes /sys/kernel/mm/ksm for every process of the
host, and any two mergeable pages merge, whichever sandbox they belong to
(docs/security.md, "Memory merging").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

__all__ = ["HAS_KSM", "KSM_DIR", "KsmState", "decide", "read_state", "process_stat",
           "ksmd_cpu_seconds", "MODES"]

log = structlog.get_logger("deltabox.host.ksm")

KSM_DIR = Path("/sys/kernel/mm/ksm")
MODES = ("off", "on", "auto")
_KERNEL_DEFAULT_PAGES_TO_SCAN = 100
# /proc/<pid>/ksm_stat with ksm_merge_any (Linux >= 6.4 has PR_SET_MEMORY_MERGE; ksm_stat
# says whether a process carries it): probed once.
HAS_KSM = (KSM_DIR / "run").exists() and "ksm_merge_any" in (
    Path("/proc/self/ksm_stat").read_text() if Path("/proc/self/ksm_stat").exists() else "")


@dataclass(frozen=True)
class KsmState:
    run: int             # 0 stopped, 1 running, 2 unmerge all
    pages_to_scan: int   # per wake-up of ksmd
    sleep_millisecs: int
    pages_shared: int    # merged pages in use (one copy each)
    pages_sharing: int   # how many more sites use them: the pages saved
    full_scans: int


def _read_int(name: str) -> int:
    return int((KSM_DIR / name).read_text())


def read_state() -> KsmState:
    return KsmState(*(_read_int(n) for n in ("run", "pages_to_scan", "sleep_millisecs",
                                              "pages_shared", "pages_sharing", "full_scans")))


def decide(mode: str, pages_to_scan: int) -> bool:
    """Whether sandboxes are to be marked mergeable under the `ksm` setting `mode`.

    off: never. auto: only if ksmd already runs (the host's owner turned it on; nothing on
    the host is changed). on: turn ksmd on (host-wide) and, if its scan rate is still the
    kernel's default (100 pages per 20 ms: 100 MB takes ~25 s to merge), set
    `pages_to_scan`; 0 leaves the rate alone. On a kernel without KSM, `on` and `auto`
    mark nothing and say so in the log."""
    if mode == "off":
        return False
    if not HAS_KSM:
        log.warning("ksm.unavailable", mode=mode,
                    reason="this kernel has no KSM or no PR_SET_MEMORY_MERGE (Linux >= 6.4)")
        return False
    state = read_state()
    if mode == "auto":
        log.info("ksm.auto", merging=state.run == 1, run=state.run)
        return state.run == 1
    if pages_to_scan and state.pages_to_scan == _KERNEL_DEFAULT_PAGES_TO_SCAN:
        (KSM_DIR / "pages_to_scan").write_text(str(pages_to_scan))
    if state.run != 1:
        (KSM_DIR / "run").write_text("1")
    log.info("ksm.on", was_running=state.run == 1, pages_to_scan=_read_int("pages_to_scan"),
             sleep_millisecs=state.sleep_millisecs)
    return True


def process_stat(pid: int) -> dict[str, int | bool]:
    """/proc/<pid>/ksm_stat: ksm_merging_pages (this process's pages that are merged),
    ksm_rmap_items, ksm_process_profit, ksm_merge_any (PR_SET_MEMORY_MERGE),
    ksm_mergeable (any area is mergeable). {} if the process is gone."""
    out: dict[str, int | bool] = {}
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.replace(":", " ").partition(" ")
        value = value.strip()
        out[key] = value == "yes" if value in ("yes", "no") else int(value)
    return out


def ksmd_cpu_seconds() -> float:
    """User + system CPU time of the kernel's ksmd thread so far (0.0 if none)."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if Path(entry.path, "comm").read_text().strip() != "ksmd":
                continue
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return 0.0
