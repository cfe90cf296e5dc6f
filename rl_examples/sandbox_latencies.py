"""Measure the sandbox operations an RL step waits for, for gpu_harness.py.

    sudo .venv/bin/python rl_examples/sandbox_latencies.py [--socket PATH] [--rss-mb 100]
         [--iterations 20] --out LAT.json

On a sandbox from the demo image with a Python session holding --rss-mb of
memory, through gRPC (what a trainer waits for):
  checkpoint           full checkpoint (files + processes)
  rollback             rollback to the latest checkpoint (the body double path)
  restore              rollback to an older checkpoint (the CRIU restore path)
and, in the same run, what users do today on the same sandbox:
  baseline_checkpoint  a plain `criu dump --leave-running` + shutil.copytree of its root
  baseline_rollback    a CRIU restore (the daemon's restore path) + shutil.copytree back
Writes {"samples_ms": {op: [ms, ...]}, "summary": {op: {p50, p95}}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import deltabox
from deltabox.host.criu import find_criu


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--rss-mb", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--scratch", default="/var/lib/deltabox-bench",
                    help="where the baseline copies go (ideally the same filesystem)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    samples: dict[str, list[float]] = {k: [] for k in (
        "checkpoint", "rollback", "restore", "copytree", "criu_dump")}
    criu = find_criu()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    with deltabox.Client(args.socket) as c, c.create("demo", memory=(args.rss_mb + 512) << 20) as s:
        py = s.open_session("python", name="agent")
        py.run(f"import os; blob = os.urandom({args.rss_mb} << 20); counter = 0")
        first = s.checkpoint("first", full=True)
        for i in range(args.iterations):
            py.run("counter += 1")
            t0 = time.perf_counter()
            ck = s.checkpoint(f"step {i}", full=True)
            samples["checkpoint"].append(1000 * (time.perf_counter() - t0))
            py.run("counter += 100")
            time.sleep(0.5 + args.rss_mb / 200)  # let the daemon prepare the body double
            t0 = time.perf_counter()
            r = s.rollback(ck)
            samples["rollback"].append(1000 * (time.perf_counter() - t0))
            assert r.path == "double", r.path
        for _ in range(max(3, args.iterations // 4)):
            t0 = time.perf_counter()
            r = s.rollback(first)
            samples["restore"].append(1000 * (time.perf_counter() - t0))
            assert r.path in ("restore", "double"), r.path
            s.rollback(ck)
        # Today's way, on the same sandbox: a plain CRIU dump and a full copy.
        s.info = c.get(s.id).info
        root = Path(f"/proc/{s.info.init_pid}/root")
        for _ in range(max(3, args.iterations // 4)):
            dst = Path(tempfile.mkdtemp(dir=scratch))
            t0 = time.perf_counter()
            shutil.copytree(root, dst / "fs", symlinks=True,
                            ignore=shutil.ignore_patterns("proc", "dev", "sys"))
            samples["copytree"].append(1000 * (time.perf_counter() - t0))
            if criu:
                img = dst / "img"
                img.mkdir()
                t0 = time.perf_counter()
                subprocess.run([str(criu), "dump", "-t", str(s.info.init_pid), "-D", str(img),
                                "--root", str(root), "--external", "mnt[/]:root",
                                "--leave-running", "--tcp-established", "--file-locks",
                                "--network-lock", "skip", "--manage-cgroups=ignore"],
                               check=True, capture_output=True)
                samples["criu_dump"].append(1000 * (time.perf_counter() - t0))
            shutil.rmtree(dst)
    cp = statistics.median(samples["copytree"])
    samples["baseline_checkpoint"] = [d + cp for d in samples["criu_dump"]] or \
        samples["copytree"]
    samples["baseline_rollback"] = [r + cp for r in samples["restore"]]
    summary = {k: {"p50": pct(v, 50), "p95": pct(v, 95), "n": len(v)}
               for k, v in samples.items() if v}
    Path(args.out).write_text(json.dumps({"rss_mb": args.rss_mb, "samples_ms": samples,
                                          "summary": summary}, indent=2))
    for k, v in summary.items():
        print(f"{k:20s} p50 {v['p50']:9.1f} ms  p95 {v['p95']:9.1f} ms  (n={v['n']})")


if __name__ == "__main__":
    main()
