"""What every `deltabox bench` shares: the throw-away daemon, RPC timing, samples, the
daemon's background work seen through psutil and its cgroup driver, and the driver that
turns a run into a JSON document.

A `DaemonBench` runs its `body` against a `deltabox.testing.ThrowawayDaemon` started
with CPU accounting (so a fork's own CPU time can be told from other work on the host),
records rows built by `Cell`, and hands the document to its `analyse` (targets, ratios).
Percentiles are `deltabox.stats` (linear interpolation, numpy's default) everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from deltabox.stats import percentile, summary

__all__ = ["Cell", "DaemonBench", "DaemonView", "run_main", "CACHE", "timed_ms"]

CACHE = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))


def timed_ms(fn) -> tuple[object, float]:
    """(fn(), wall milliseconds)."""
    t0 = time.perf_counter()
    res = fn()
    return res, 1000 * (time.perf_counter() - t0)


class Cell:
    """Samples of one (operation, tree/state, step, depth) cell: the client's wall time
    ("gRPC"), the daemon's own total_ms ("daemon"), its RPC interceptor's time
    ("handler"), the daemon's phase breakdown and the rollback paths taken."""

    def __init__(self):
        self.daemon: list[float] = []
        self.grpc: list[float] = []
        self.handler: list[float] = []
        self.parts: dict[str, list[float]] = {}
        self.paths: dict[str, int] = {}
        self.failed = 0

    def add(self, wall_ms: float, handler_ms: float | None, timings, path: str = "") -> None:
        timings = dict(timings)
        self.grpc.append(wall_ms)
        if "total_ms" in timings:
            self.daemon.append(timings.pop("total_ms"))
        if handler_ms is not None:
            self.handler.append(handler_ms)
        for k, v in timings.items():
            self.parts.setdefault(k, []).append(v)
        if path:
            self.paths[str(path)] = self.paths.get(str(path), 0) + 1

    def row(self, **kw) -> dict:
        row = dict(kw, iterations=len(self.grpc),
                   daemon_ms=summary(self.daemon) if self.daemon else None,
                   handler_ms=summary(self.handler) if self.handler else None,
                   grpc_ms=summary(self.grpc),
                   breakdown_p50_ms={k: round(percentile(v, 50), 3)
                                     for k, v in self.parts.items()})
        if self.paths:
            row["paths"] = self.paths
        if self.failed:
            row["failed_children"] = self.failed
        return row


class DaemonView:
    """The throw-away daemon's processes and sandbox cgroups, read through psutil and
    `deltabox.host.cgroups` (never by parsing /proc by hand)."""

    def __init__(self, daemon):
        from deltabox.host.cgroups import detect_driver
        self.daemon = daemon
        self.proc = psutil.Process(daemon.pid)
        self.cgroups = detect_driver(daemon.instance)
        self.mnt_dir = daemon.state_dir / "store" / "mnt"

    def children(self) -> list[psutil.Process]:
        try:
            return self.proc.children(recursive=False)
        except psutil.Error:
            return []

    def criu_running(self) -> int:
        n = 0
        for p in self.children():
            try:
                n += p.name() == "criu"
            except psutil.Error:
                pass
        return n

    def cpu_ticks(self) -> float:
        """CPU seconds of the daemon process itself (all threads)."""
        t = self.proc.cpu_times()
        return t.user + t.system

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Until no criu runs and the daemon's own CPU is flat for 100 ms (its background
        work -- doubles, image deduplication -- done). False if `timeout` s passed first."""
        deadline, quiet, cpu0 = time.monotonic() + timeout, 0, self.cpu_ticks()
        while quiet < 4:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.025)
            cpu = self.cpu_ticks()
            quiet = quiet + 1 if self.criu_running() == 0 and cpu - cpu0 <= 0.01 else 0
            cpu0 = cpu
        return True

    def branch_mounts(self) -> int:
        prefix = str(self.mnt_dir) + "/"
        return sum(1 for p in psutil.disk_partitions(all=True)
                   if p.mountpoint.startswith(prefix))

    def freezer_state(self, name: str) -> str:
        """THAWED, FREEZING or FROZEN for sandbox cgroup `name` (v1 freezer.state; v2
        cgroup.freeze + cgroup.events)."""
        d = self.cgroups.freezer_path(name)
        try:
            if self.cgroups.version == 1:
                return (d / "freezer.state").read_text().strip()
            if (d / "cgroup.freeze").read_text().strip() == "0":
                return "THAWED"
            return "FROZEN" if "frozen 1" in (d / "cgroup.events").read_text() else "FREEZING"
        except OSError:
            return "THAWED"

    def frozen_cgroups(self) -> set[str]:
        """Sandbox cgroups frozen now: body doubles (and a sandbox mid-checkpoint)."""
        return {n for n in self.cgroups.names() if self.freezer_state(n) == "FROZEN"}

    def cgroup_of(self, pid: int) -> str | None:
        for n in self.cgroups.names():
            if pid in self.cgroups.pids(n):
                return n
        return None

    def children_summary(self) -> dict[str, int]:
        kids: dict[str, int] = {}
        for p in self.children():
            try:
                what = f"{p.name()} ({p.status()})"
            except psutil.Error:
                continue
            kids[what] = kids.get(what, 0) + 1
        return kids


class DaemonBench:
    """A benchmark on a throw-away daemon. Subclasses implement `preflight`, `body`,
    `document` and `analyse`."""

    benchmark = ""
    daemon_args: tuple = ()  # options for the throw-away daemon

    def __init__(self, plan, console, json_out: bool):
        self.plan = plan
        self.console = console
        self.json_out = json_out
        self.results: list[dict] = []
        self.baselines: list[dict] = []
        self.unsettled = 0
        self.leaks: list[dict] = []
        self.daemon = None
        self.view: DaemonView | None = None

    def log(self, msg: str) -> None:
        self.console.log(msg)

    def record(self, **row) -> dict:
        self.results.append(row)
        return row

    def rpc_totals(self, client, method: str) -> tuple[float, int]:
        """(sum of seconds, count) of successful `method` calls, as the daemon's RPC
        interceptor timed them (Stats' Prometheus histogram)."""
        from prometheus_client.parser import text_string_to_metric_families
        total, count = 0.0, 0
        for fam in text_string_to_metric_families(client.stats().prometheus_text):
            if fam.name != "deltabox_rpc_seconds":
                continue
            for s in fam.samples:
                if s.labels.get("method") == method and s.labels.get("code") == "OK":
                    if s.name.endswith("_sum"):
                        total = s.value
                    elif s.name.endswith("_count"):
                        count = int(s.value)
        return total, count

    def timed(self, client, method: str, fn, then=None):
        """(result, client wall ms, daemon handler ms or None) of one RPC. `then()`, if
        given, runs right after the RPC returns (before the daemon's histogram is read
        again, so it sees the daemon as the caller would)."""
        s0 = self.rpc_totals(client, method)
        res, wall = timed_ms(fn)
        if then is not None:
            then()
        s1 = self.rpc_totals(client, method)
        handler = 1000 * (s1[0] - s0[0]) if s1[1] - s0[1] == 1 else None
        return res, wall, handler

    def measure_floor(self, client, sbx, pause: float = 0.0, op: str = "GetSandbox (gRPC floor)",
                      **keys) -> None:
        """The cheapest RPC (GetSandbox: one SQLite read), for scale; `pause` s of
        idleness before each call (waking idle CPUs and threads costs on a VM)."""
        cell = Cell()
        for _ in range(max(20, self.plan.iterations)):
            time.sleep(pause)
            _, wall, handler = self.timed(client, "GetSandbox", lambda: client.get(sbx.id))
            cell.add(wall, handler, {})
        self.record(**cell.row(op=op, **keys))

    # -- hooks ----------------------------------------------------------------------------

    def preflight(self) -> None:
        """Refuse early (missing images, tools)."""

    def body(self, client, work: Path) -> None:
        """The measurements; `work` is a scratch dir on the store's XFS."""
        raise NotImplementedError

    def document(self) -> dict:
        raise NotImplementedError

    def analyse(self, doc: dict) -> None:
        """Add "ratios", "targets" and benchmark-specific notes to `doc`."""

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> dict:
        from deltabox.testing import ThrowawayDaemon
        if os.geteuid() != 0:
            raise SystemExit("deltabox bench runs its own daemon, which needs root")
        self.preflight()
        started = time.time()
        load0 = os.getloadavg()
        daemon = ThrowawayDaemon(accounting=True, extra_args=tuple(self.daemon_args))
        work = daemon.state_dir / "store" / "bench"  # same XFS as the layers
        daemon.image_dirs = (CACHE / "images", work)  # $DELTABOX_CACHE, as the daemon's
        backing = ""
        try:
            self.log(f"starting a daemon on {daemon.state_dir}")
            self.daemon = daemon.start()
            self.view = DaemonView(daemon)
            with daemon.client() as client:
                self.status = client.status()
                backing = self.status.store_backing
                self.body(client, work)
        finally:
            left = daemon.cleanup()
            if left:
                self.plan.notes.append(f"cleaned up after the daemon: {left}")
        doc = {
            "benchmark": self.benchmark,
            "version": 2,
            "code": revision(),
            "host": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                     "loadavg_start": [round(x, 2) for x in load0],
                     "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                     "store_backing": backing},
            "percentile": "linear interpolation between closest ranks (numpy's default)",
        }
        doc.update(self.document())
        doc["notes"] = list(self.plan.notes)
        self.analyse(doc)
        doc["elapsed_s"] = round(time.time() - started, 1)
        return doc


def revision() -> str:
    """The git revision of the code under test (+dirty), if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("+dirty" if rev and dirty else "")


def run_main(args, plan, bench_cls, render_fn) -> int:
    """Run `bench_cls` with `plan`; print the JSON document (--json) or render it."""
    from rich.console import Console
    if args.iterations is not None and args.iterations < 1:
        raise SystemExit("--iterations must be >= 1")
    json_out = bool(getattr(args, "json", False))
    # Progress goes to stderr, so that --json leaves stdout a clean document.
    console = Console(stderr=True)
    doc = bench_cls(plan, console, json_out).run()
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render_fn(doc, Console(width=None if sys.stdout.isatty() else 200))
    return 0
