"""`deltabox bench cr`'s baselines: what a competent user does today, on the same
sandbox, in the same run, with as many samples as DeltaCR's rollbacks.

Per iteration, on the sandbox's live process tree (its init and everything below it):

1. `criu dump --leave-running` of the tree (the daemon's CRIU binary, its CLI, the
   options the daemon uses) into a directory on the store's XFS;
2. the changed files -- the ones the agent step wrote (`CHANGED`) -- copied with
   `cp -a --reflink=auto` into a snapshot directory;
3. a plain `criu restore --restore-detached` of those images onto a copy of the
   sandbox's root (made untimed, bind-mounted: the user's container directory), plus
   the changed files copied back with `cp -a --reflink=auto`. The restored tree is
   killed afterwards, untimed.

"checkpoint: criu dump + cp changed files" = 1 + 2; "rollback: criu restore + cp
changed files" = 3 -- the primary baselines. The second, labelled baseline copies the
whole root instead (`shutil.copytree` without proc/dev/sys): "... + copytree of the
root". It is kept because that is what a user without a snapshotting filesystem does,
but it is mostly file copying (94 % of it at 10 MB), which DeltaCR never does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from deltabox.stats import percentile, summary

__all__ = ["PlainCriuBaseline", "CHANGED"]

# The files an agent step of `deltabox bench cr` writes (CRBench.step).
CHANGED = ("root/notes.txt",)

_CRIU_COMMON = ["--tcp-established", "--file-locks", "--manage-cgroups=ignore"]


def _skip_virtual(top: str):
    def skip(d, names):
        return {"proc", "dev", "sys"} & set(names) if d == top else set()
    return skip


class PlainCriuBaseline:
    """The measurements above for one state (rss `mb`) of one sandbox."""

    def __init__(self, criu_bin: Path, work: Path, mb: int, log):
        self.criu = str(criu_bin)
        self.work = work
        self.mb = mb
        self.log = log
        self.dumps: list[float] = []
        self.copy_changed: list[float] = []
        self.copytree: list[float] = []
        self.restores: list[float] = []
        self.copy_back: list[float] = []
        self.images: list[float] = []
        self.copy_info: dict = {}

    def once(self, pid: int, i: int) -> None:
        root = f"/proc/{pid}/root"
        dst = self.work / f"cr-baseline-{self.mb}-{i}"
        img, snap, fs = dst / "img", dst / "snap", dst / "fs"
        for d in (img, snap):
            d.mkdir(parents=True)
        t0 = time.perf_counter()
        self._criu("dump", "-t", str(pid), "-D", str(img), "-o", "dump.log", "--root", root,
                   "--external", "mnt[/]:root", "--leave-running", "--network-lock", "skip",
                   "--link-remap", log=img / "dump.log")
        self.dumps.append(1000 * (time.perf_counter() - t0))
        self.images.append(sum(p.stat().st_size for p in img.glob("*.img")) / 2**20)
        self.copy_changed.append(self._copy_files(root, snap))
        # The second baseline's copy is also the user's container directory to restore on.
        t0 = time.perf_counter()
        shutil.copytree(root, fs, symlinks=True, ignore=_skip_virtual(root))
        self.copytree.append(1000 * (time.perf_counter() - t0))
        for d in ("proc", "dev", "sys"):
            (fs / d).mkdir(exist_ok=True)
        if not self.copy_info:
            files = sum(len(f) for _, _, f in os.walk(fs))
            size = sum(os.lstat(os.path.join(p, n)).st_size for p, _, fl in os.walk(fs)
                       for n in fl)
            self.copy_info = {"files": files, "mib": round(size / 2**20)}
        subprocess.run(["mount", "--bind", str(fs), str(fs)], check=True)
        try:
            t0 = time.perf_counter()
            self._criu("restore", "-D", str(img), "-o", "restore.log", "--root", str(fs),
                       "--external", f"mnt[root]:{fs}", "--restore-detached",
                       "--restore-sibling", "--pidfile", str(dst / "restored.pid"),
                       log=img / "restore.log")
            t1 = time.perf_counter()
            self.copy_back.append(self._copy_files(str(snap), fs))
            self.restores.append(1000 * (t1 - t0))
            self._kill_restored(int((dst / "restored.pid").read_text()))
        finally:
            subprocess.run(["umount", "-l", str(fs)], check=False)
            subprocess.run(["rm", "-rf", "--one-file-system", str(dst)], check=True)
            subprocess.run(["sync", "-f", str(self.work)], check=False)

    def _criu(self, *args: str, log: Path) -> None:
        r = subprocess.run([self.criu, *args, *_CRIU_COMMON], capture_output=True, timeout=600)
        if r.returncode != 0:
            text = log.read_text(errors="replace") if log.exists() else \
                r.stderr.decode(errors="replace")
            raise RuntimeError(f"criu {args[0]} exited {r.returncode}: " + " | ".join(
                ln for ln in text.splitlines() if "Error" in ln)[-800:])

    @staticmethod
    def _copy_files(src_root: str, dst_root: Path) -> float:
        """ms to copy the CHANGED files from src_root to dst_root (cp -a --reflink=auto)."""
        t0 = time.perf_counter()
        for rel in CHANGED:
            (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", "--reflink=auto", f"{src_root}/{rel}",
                            str(dst_root / rel)], check=True)
        return 1000 * (time.perf_counter() - t0)

    @staticmethod
    def _kill_restored(pid: int) -> None:
        """The restored tree's init is our child (--restore-sibling): SIGKILL ends its pid
        namespace; reap it."""
        try:
            p = psutil.Process(pid)
            p.kill()
            p.wait(10)
        except psutil.NoSuchProcess:
            pass

    def rows(self) -> list[dict]:
        n, mb = len(self.dumps), self.mb
        pair = zip  # iteration i's parts belong together
        return [
            {"op": "criu dump (CLI, --leave-running)", "rss_mb": mb, "iterations": n,
             "ms": summary(self.dumps), "image_mb": round(percentile(self.images, 50), 1)},
            {"op": "criu restore (CLI, detached)", "rss_mb": mb, "iterations": n,
             "ms": summary(self.restores)},
            {"op": "cp --reflink=auto of the changed files", "rss_mb": mb, "iterations": n,
             "ms": summary(self.copy_changed), "files": len(CHANGED)},
            {"op": "shutil.copytree of the sandbox root", "rss_mb": mb, "iterations": n,
             "ms": summary(self.copytree), **self.copy_info},
            {"op": CHECKPOINT_PLAIN, "rss_mb": mb, "iterations": n, "primary": True,
             "ms": summary([d + c for d, c in pair(self.dumps, self.copy_changed)])},
            {"op": ROLLBACK_PLAIN, "rss_mb": mb, "iterations": n, "primary": True,
             "ms": summary([r + c for r, c in pair(self.restores, self.copy_back)])},
            {"op": CHECKPOINT_COPYTREE, "rss_mb": mb, "iterations": n,
             "ms": summary([d + c for d, c in pair(self.dumps, self.copytree)])},
            {"op": ROLLBACK_COPYTREE, "rss_mb": mb, "iterations": n,
             "ms": summary([r + c for r, c in pair(self.restores, self.copytree)])},
        ]


CHECKPOINT_PLAIN = "checkpoint: criu dump + cp changed files"
ROLLBACK_PLAIN = "rollback: criu restore + cp changed files"
CHECKPOINT_COPYTREE = "checkpoint (2nd baseline): criu dump + copytree of the root"
ROLLBACK_COPYTREE = "rollback (2nd baseline): criu restore + copytree of the root"
