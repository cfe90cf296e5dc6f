"""Measure the sandbox operations an RL step waits for, and today's way, for gpu_harness.py.

    sudo .venv/bin/python rl_examples/sandbox_latencies.py [--socket PATH] [--rss-mb 100]
         [--iterations 10] [--no-whole-root] --out LAT.json

One sandbox from the demo image holds a Python session with --rss-mb of memory and an
agent workspace /work (a 1 MiB data file and a log). A *step* changes both: the
session's counter and the workspace's files. Each iteration takes one sample of every
operation below, interleaved, so load on the machine hits all of them alike.

DeltaBox, through gRPC, timed by the client:
  action                the step itself (a session call + an exec): the action's own
                        run time, the same whatever checkpoints it
  checkpoint            full checkpoint (files + processes) after a step
  rollback              a step, then at once back to that checkpoint: the path an action
                        that fails fast hits (the daemon may still be building the
                        checkpoint's body double and wait for it; the path is recorded)
  rollback_ready        the same once the double is ready (the daemon's fast path)
  restore               back to an older checkpoint (the CRIU restore path)

Baseline: what a competent user does today with the same tree, no daemon involved:
  baseline_checkpoint   plain `criu dump --leave-running` of the sandbox's process tree
                        + `cp -a --reflink=auto` of the changed files (the workspace)
  baseline_rollback     `cp -a --reflink=auto` of those files back + plain `criu restore`
                        of the dump, onto a copy of the sandbox's root taken after the
                        next step (the user's container directory; made untimed, so the
                        live sandbox is never touched), timed until criu returns with the
                        restored tree running; that tree is then killed, untimed
The method is the one of `deltabox bench cr` (deltabox/bench/cr_baseline.py).
Second, labelled baseline (skip with --no-whole-root): the same plain CRIU dump/restore
with a copy of the whole root (shutil.copytree, without proc/dev/sys) instead of the
changed files: baseline_checkpoint_whole_root, baseline_rollback_whole_root.

Every operation has the same number of samples. Writes
{"samples_ms": {op: [ms, ...]}, "summary": {op: {p50, p95, min, max, n}},
"rollback_paths": {...}} (percentiles from deltabox.stats).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import deltabox
from deltabox.host.criu import find_criu
from deltabox.stats import summary

WORKSPACE = "/work"
# CRIU options the daemon uses too (deltabox/host/criu.py), as CLI flags.
CRIU_COMMON = ["--tcp-established", "--file-locks", "--manage-cgroups=ignore"]
OPS = ("action", "checkpoint", "rollback", "rollback_ready", "restore",
       "baseline_checkpoint", "baseline_rollback",
       "baseline_checkpoint_whole_root", "baseline_rollback_whole_root")


def ms_since(t0: float) -> float:
    return 1000 * (time.perf_counter() - t0)


def step(sbx, py, i: int) -> float:
    """What an agent's action does: change the session's state and the workspace.
    Returns the action's own run time (ms, client-side)."""
    t0 = time.perf_counter()
    py.run("counter += 1")
    sbx.exec(f"head -c 1M /dev/urandom > {WORKSPACE}/data && echo {i} >> {WORKSPACE}/log")
    return ms_since(t0)


def wait_ready(sbx, ckpt_id: str, timeout: float = 60.0) -> None:
    """Until the checkpoint's body double is built (untimed: the rollback_ready case)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.id == ckpt_id and c.ready for c in sbx.checkpoints()):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the body double of {ckpt_id} was not ready within {timeout:.0f} s")


class PlainCriu:
    """Today's way on the same tree: the criu CLI and copies of files, no daemon.

    The same method as `deltabox bench cr` (deltabox/bench/cr_baseline.py): dump the
    live tree; restore it onto a copy of its root (the user's container directory,
    bind-mounted) so the live sandbox is never touched."""

    def __init__(self, criu: Path, pid: int):
        self.criu, self.pid = str(criu), pid
        self.root = f"/proc/{pid}/root"

    def dump(self, images: Path) -> None:
        self._run([self.criu, "dump", "-t", str(self.pid), "-D", str(images), "--root",
                   self.root, "--external", "mnt[/]:root", "--leave-running",
                   "--link-remap", "--ghost-limit", "512M", "--network-lock", "skip",
                   *CRIU_COMMON, "-o", "dump.log"], images / "dump.log")

    def dump_retrying(self, images: Path, attempts: int = 5) -> int:
        """`dump`, retried when CRIU refuses an external unix socket: the daemon's own
        connection to the sandbox's init, caught mid-flight (an artefact of dumping a
        daemon's sandbox; a user's container has none). Returns how many retries it took."""
        for attempt in range(attempts):
            try:
                self.dump(images)
                return attempt
            except RuntimeError as e:
                if "Unix socket" not in str(e) or attempt == attempts - 1:
                    raise
                subprocess.run(["rm", "-rf", str(images)], check=True)
                images.mkdir()
        raise AssertionError("unreachable")

    def restore(self, images: Path, root: Path) -> int:
        """Restore (detached) onto `root`; returns the restored init's host pid."""
        pidfile = images / "restored.pid"
        self._run([self.criu, "restore", "-D", str(images), "--restore-detached",
                   "--restore-sibling", "--root", str(root), "--external",
                   f"mnt[root]:{root}", *CRIU_COMMON, "--pidfile", str(pidfile),
                   "-o", "restore.log"], images / "restore.log")
        return int(pidfile.read_text())

    @staticmethod
    def copy_changed(src_root: str | Path, dst_root: Path) -> None:
        """The changed files -- the workspace -- from one root to another."""
        dst = Path(f"{dst_root}{WORKSPACE}")
        subprocess.run(["rm", "-rf", str(dst)], check=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--reflink=auto", f"{src_root}{WORKSPACE}", str(dst)],
                       check=True)

    def copy_whole_root(self, dst: Path) -> None:
        top = self.root
        shutil.copytree(top, dst, symlinks=True, ignore=lambda d, names: (
            {"proc", "dev", "sys"} & set(names) if d == top else set()))
        for d in ("proc", "dev", "sys"):
            (dst / d).mkdir(exist_ok=True)

    @staticmethod
    def _run(cmd: list[str], log: Path) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else r.stderr
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({r.returncode}):\n{tail}")


def kill_tree(pid: int) -> None:
    """Kill a restored copy (our child: --restore-sibling) and reap it; its init is the
    root of a pid namespace, which dies with it."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def measure_baseline(plain: PlainCriu, work: Path, sbx, py, i: int,
                     samples: dict[str, list[float]], whole_root: bool) -> None:
    """One sample of each baseline (see the module docstring)."""
    img, snap, fs = work / "img", work / "snap", work / "fs"
    img.mkdir()
    snap.mkdir()
    t0 = time.perf_counter()
    plain.dump(img)
    t_dump = ms_since(t0)
    plain.copy_changed(plain.root, snap)
    samples["baseline_checkpoint"].append(ms_since(t0))
    step(sbx, py, i)  # the tree runs on and breaks something
    # The user's container directory at that point (untimed for the primary baseline;
    # the second baseline's copy, timed).
    t0 = time.perf_counter()
    plain.copy_whole_root(fs)
    t_copy = ms_since(t0)
    subprocess.run(["mount", "--bind", str(fs), str(fs)], check=True)
    try:
        t0 = time.perf_counter()
        plain.copy_changed(snap, fs)
        restored = plain.restore(img, fs)
        samples["baseline_rollback"].append(ms_since(t0))
        t_restore = samples["baseline_rollback"][-1]
        kill_tree(restored)
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)
    if whole_root:
        samples["baseline_checkpoint_whole_root"].append(t_dump + t_copy)
        samples["baseline_rollback_whole_root"].append(t_restore + t_copy)


def measure(client, sbx, args, samples: dict[str, list[float]], paths: Counter) -> None:
    py = sbx.open_session("python", name="agent")
    py.run(f"import os; blob = os.urandom({args.rss_mb} << 20); counter = 0")
    sbx.exec(f"mkdir -p {WORKSPACE}")
    step(sbx, py, -1)
    first = sbx.checkpoint("first", full=True)
    for i in range(args.iterations):
        # DeltaBox
        samples["action"].append(step(sbx, py, i))
        t0 = time.perf_counter()
        ck = sbx.checkpoint(f"step {i}", full=True)
        samples["checkpoint"].append(ms_since(t0))
        expected = py.run("print(counter)").stdout
        step(sbx, py, i)
        t0 = time.perf_counter()
        res = sbx.rollback(ck)
        samples["rollback"].append(ms_since(t0))
        paths[f"rollback: {res.path}"] += 1
        assert py.run("print(counter)").stdout == expected, "the rollback lost the session"
        wait_ready(sbx, ck.id)
        step(sbx, py, i)
        t0 = time.perf_counter()
        res = sbx.rollback(ck)
        samples["rollback_ready"].append(ms_since(t0))
        paths[f"rollback_ready: {res.path}"] += 1
        t0 = time.perf_counter()
        res = sbx.rollback(first)
        samples["restore"].append(ms_since(t0))
        paths[f"restore: {res.path}"] += 1
        # Today's way, on the same tree (a rollback swapped in a new init: ask for it).
        step(sbx, py, i)
        plain = PlainCriu(find_criu(), client.get(sbx.id).info.init_pid)
        work = Path(tempfile.mkdtemp(dir=args.scratch))
        try:
            measure_baseline(plain, work, sbx, py, i, samples, args.whole_root)
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        print(f"iteration {i + 1}/{args.iterations} done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--rss-mb", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--scratch", default=None,
                    help="where the baseline's images and copies go (default: the daemon's "
                         "store, the same XFS as the sandbox's files, so reflinks can work)")
    ap.add_argument("--no-whole-root", dest="whole_root", action="store_false",
                    help="skip the second baseline (a copy of the whole root)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if find_criu() is None:
        raise SystemExit("no criu binary found (native/setup-host.sh builds one)")
    samples: dict[str, list[float]] = {op: [] for op in OPS}
    paths: Counter = Counter()
    load_before = os.getloadavg()
    with deltabox.Client(args.socket) as c:
        if args.scratch is None:
            args.scratch = str(Path(c.status().state_dir) / "store" / "tmp")
        with c.create("demo", memory=(args.rss_mb + 512) << 20) as sbx:
            measure(c, sbx, args, samples, paths)
    samples = {op: xs for op, xs in samples.items() if xs}
    summ = {op: summary(xs, 1) for op, xs in samples.items()}
    Path(args.out).write_text(json.dumps({
        "rss_mb": args.rss_mb, "iterations": args.iterations, "samples_ms": samples,
        "summary": summ, "rollback_paths": dict(paths),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()}}, indent=2))
    for op, s in summ.items():
        print(f"{op:32s} p50 {s['p50']:9.1f} ms  p95 {s['p95']:9.1f} ms  (n={s['n']})")
    print("rollback paths:", dict(paths))


if __name__ == "__main__":
    main()
