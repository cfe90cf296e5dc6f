"""`deltabox bench`: benchmarks on a throw-away daemon (as root).

`deltabox bench fs` measures DeltaFS -- checkpoint, rollback and fork -- over
real source trees and compares it with what users do today on the same tree:
`shutil.copytree`, `cp -a --reflink=always` and tar.

How it measures
---------------
* A daemon is started on a temporary state dir (a loop-backed XFS image), as
  `deltabox demo` does; everything is removed at the end.
* Trees: Python projects unpacked from their PyPI sdists (fetched once with
  pip into $DELTABOX_CACHE/bench/sdists, default /var/cache/deltabox/...), or
  `synthetic:N` (N generated small files, no network). Each tree is put under
  /work of the tiny busybox rootfs and imported as an image.
* A "step that changes k files" is an exec inside the sandbox that appends a
  line to k existing files of the tree, spread over its directories.
* Chain depth d: the sandbox takes checkpoints c1..c100 (a 10-file step each,
  waiting for the daemon's background squash whenever the mounted chain grows
  past its limit). "At depth d" means on top of c_d: every measured
  checkpoint starts from a rollback to c_d (untimed), so its upper holds just
  the step's k files.
* Rollback "standby": back to the sandbox's latest checkpoint after the
  daemon has prepared the standby incarnation; "fresh": alternately to c_d and
  c_(d-1), which is never the standby's target.
* Fork(n) of c_d: until the RPC returns (all n children's inits run); the
  children are destroyed afterwards, untimed. If the daemon has the Warm RPC,
  "fork n (warm)" repeats it after Warm(n, wait=True) (untimed).
* Three times per operation: "daemon" is the daemon's own
  timings_ms["total_ms"]; "handler" the daemon's RPC interceptor time for that
  one call (from Stats' histogram: adds the lock, the thread hop, logging);
  "gRPC" the client's wall time around the blocking call. "GetSandbox (gRPC
  floor)" is the cheapest RPC, for scale.
* Before each timed operation the bench waits until the daemon's background
  work (standby preparation, retiring old branches) is done: the branch
  mounts steady for 100 ms, then 100 ms more.
* Baselines run on the host on the same XFS filesystem as the store, with a
  warm page cache like the sandbox operations.
* Needs root. At the end the daemon is stopped and whatever it left behind
  under the temporary state dir (leaked sandbox inits, cgroups, mounts) is
  removed and reported.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["main_fs", "TREES"]

CACHE = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))

# Named trees: pinned sdists (setuptools builds, so `pip download` needs no extra
# build backend). django: 6,798 files, 44 MB. mono: 20,042 files, 280 MB.
TREES: dict[str, list[str]] = {
    "django": ["django==5.1"],
    "mono": ["django==5.1", "ansible-core==2.17.5", "botocore==1.35.40", "sympy==1.13.3",
             "mypy==1.11.2", "sqlalchemy==2.0.36", "setuptools==75.1.0"],
}

TARGETS_MS = {"checkpoint": 2.0, "rollback": 2.0, "fork16": 30.0}
COPYTREE_SPEEDUP = 50.0
SMALL_TREE_FILES = 2_000
LARGE_TREE_FILES = 20_000
STEP_FILES_CHAIN = 10          # files changed per step while building the chain
STEP_SCRIPT = ('while IFS= read -r f; do echo "# deltabox bench step $S" >> "/work/$f" '
               '|| exit 1; done')


# ---- plan ----------------------------------------------------------------------------------

@dataclass
class Plan:
    trees: list[str]
    steps: tuple[int, ...] = (1, 10, 100, 1000)
    depths: tuple[int, ...] = (1, 10, 100)
    forks: tuple[int, ...] = (1, 4, 16, 64)
    iterations: int = 20
    quick: bool = False
    pause_s: float = 0.1        # quiet time before each timed operation
    notes: list[str] = field(default_factory=list)

    def n_checkpoint(self, k: int) -> int:
        return max(3, self.iterations // 2) if k >= 1000 else self.iterations

    def n_rollback(self, fresh: bool) -> int:
        return max(3, self.iterations // 2) if fresh else self.iterations

    def n_fork(self, n: int) -> int:
        return max(2, self.iterations // 6) if n >= 64 else max(3, self.iterations // 2)

    def n_baseline(self, files: int) -> int:
        return max(2, min(5, self.iterations // 4)) if files < LARGE_TREE_FILES else \
            max(2, min(3, self.iterations // 6))


def make_plan(quick: bool, iterations: int | None, trees: list[str] | None) -> Plan:
    if quick:
        plan = Plan(trees=trees or ["django"], steps=(10, 100), depths=(1, 10), forks=(1, 16),
                    iterations=iterations or 5, quick=True)
    else:
        plan = Plan(trees=trees or ["django", "mono"], iterations=iterations or 20)
    it = plan.iterations
    plan.notes.append(
        f"iterations: {it} for checkpoints of 1/10/100-file steps and standby rollbacks; "
        f"{max(3, it // 2)} for 1,000-file steps, fresh rollbacks and fork(1/4/16); "
        f"fork(64) {max(2, it // 6)}; "
        f"baselines {max(2, min(5, it // 4))} (>= {LARGE_TREE_FILES:,}-file trees: "
        f"{max(2, min(3, it // 6))}). p95 of few samples is close to the maximum.")
    return plan


# ---- statistics ----------------------------------------------------------------------------

def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    if not s:
        return float("nan")
    if q == 50:
        return statistics.median(s)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summary(samples: list[float]) -> dict:
    return {"p50": round(pct(samples, 50), 3), "p95": round(pct(samples, 95), 3),
            "min": round(min(samples), 3) if samples else None,
            "max": round(max(samples), 3) if samples else None, "n": len(samples)}


# ---- trees ---------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _sdist(spec: str, cache: Path, log) -> Path:
    """The sdist archive for `name==version`, downloaded with pip once."""
    name, _, version = spec.partition("==")
    if not version:
        raise SystemExit(f"sdist {spec!r}: pin a version (name==version)")
    cache.mkdir(parents=True, exist_ok=True)
    want = f"{_norm(name)}_{version}"

    def find() -> Path | None:
        for p in cache.iterdir():
            m = re.fullmatch(r"(.+?)\.(tar\.gz|tgz|zip|tar\.bz2)", p.name)
            if m and _norm(m.group(1)) == _norm(want):
                return p
        return None
    found = find()
    if found:
        return found
    log(f"downloading the sdist of {spec} (pip)")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                          "--no-binary", ":all:", "--no-build-isolation", "-d", str(cache),
                          spec], capture_output=True, text=True, timeout=600)
    found = find()
    if found is None:
        raise SystemExit(f"pip download {spec} failed (PyPI unreachable? use --tree "
                         f"synthetic:N):\n{res.stderr[-2000:]}")
    return found


def _unpack(archive: Path, dest: Path) -> list[str]:
    """Unpack an sdist into `dest`; returns the top-level names it added."""
    before = set(os.listdir(dest))
    if archive.name.endswith(".zip"):
        subprocess.run(["unzip", "-q", str(archive), "-d", str(dest)], check=True)
    else:
        subprocess.run(["tar", "xf", str(archive), "-C", str(dest), "--no-same-owner"],
                       check=True)
    return sorted(set(os.listdir(dest)) - before)


def _synthetic(work: Path, n: int) -> None:
    """n small text files, 20 per directory, 20 directories per top directory."""
    rng = random.Random(n)
    for i in range(n):
        d = work / f"pkg{i // 400:03d}" / f"mod{(i // 20) % 20:02d}"
        if i % 20 == 0:
            d.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def f{j}(x):\n    return x * {rng.randrange(1000)}\n"
                       for j in range(rng.randrange(5, 60)))
        (d / f"file{i:06d}.py").write_text(body)


@dataclass
class Tree:
    name: str
    sources: list[str]
    stage: Path          # rootfs staging dir on the store's XFS; the tree is stage/work
    files: list[str]     # regular files, relative to /work
    dirs: int
    bytes: int

    @property
    def work(self) -> Path:
        return self.stage / "work"

    def info(self) -> dict:
        return {"name": self.name, "files": len(self.files), "dirs": self.dirs,
                "bytes": self.bytes, "sources": self.sources}


def prepare_tree(spec: str, stage: Path, tiny_tar: Path, log) -> Tree:
    """Unpack tiny.tar into `stage` and put the tree under stage/work."""
    stage.mkdir(parents=True)
    subprocess.run(["tar", "xf", str(tiny_tar), "-C", str(stage)], check=True)
    work = stage / "work"
    work.mkdir(exist_ok=True)
    if spec.startswith("synthetic:"):
        n = int(spec.partition(":")[2])
        _synthetic(work, n)
        sources = [f"synthetic: {n} generated files"]
    else:
        specs = TREES.get(spec) or (spec.partition(":")[2].split(",")
                                    if spec.startswith("sdist:") else None)
        if not specs:
            raise SystemExit(f"unknown tree {spec!r}: use {', '.join(TREES)}, synthetic:N or "
                             "sdist:NAME==VERSION[,...]")
        sources = []
        for s in specs:
            sources += _unpack(_sdist(s, CACHE / "bench" / "sdists", log), work)
    # Owned by root and writable, as a checked-out tree is for its user.
    subprocess.run(["chown", "-R", "0:0", str(work)], check=True)
    subprocess.run(["chmod", "-R", "u+w", str(work)], check=True)
    files, dirs, size = [], 0, 0
    for dirpath, dirnames, filenames in os.walk(work):
        dirs += len(dirnames)
        rel = os.path.relpath(dirpath, work)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            size += st.st_size
            if os.path.isfile(p) and not os.path.islink(p) and "\n" not in f:
                files.append(f if rel == "." else f"{rel}/{f}")
    files.sort()
    return Tree(spec, sources, stage, files, dirs, size)


def pick_files(tree: Tree, k: int, seed: int) -> list[str]:
    """k distinct files spread over the tree's directories (round robin, seeded)."""
    rng = random.Random(seed)
    by_dir: dict[str, list[str]] = {}
    for f in tree.files:
        by_dir.setdefault(f.rpartition("/")[0], []).append(f)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_dir.items())]
    rng.shuffle(pools)
    out: list[str] = []
    k = min(k, len(tree.files))
    while len(out) < k:
        for pool in pools:
            if pool:
                out.append(pool.pop())
                if len(out) == k:
                    break
    return out


# ---- the run -------------------------------------------------------------------------------

class Cell:
    """Samples of one (operation, tree, step, depth) cell."""

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
            self.paths[path] = self.paths.get(path, 0) + 1

    def row(self, **kw) -> dict:
        row = dict(kw, iterations=len(self.grpc),
                   daemon_ms=summary(self.daemon) if self.daemon else None,
                   handler_ms=summary(self.handler) if self.handler else None,
                   grpc_ms=summary(self.grpc),
                   breakdown_p50_ms={k: round(pct(v, 50), 3) for k, v in self.parts.items()})
        if self.paths:
            row["paths"] = self.paths
        if self.failed:
            row["failed_children"] = self.failed
        return row


class Bench:
    def __init__(self, plan: Plan, console, json_out: bool):
        self.plan = plan
        self.console = console
        self.json_out = json_out
        self.results: list[dict] = []
        self.baselines: list[dict] = []
        self.trees: list[Tree] = []
        self.squashes: list[dict] = []
        self.unsettled = 0
        self.leaks: list[dict] = []
        self.warm_api = False
        from deltabox.config import Config
        self.max_chain_depth = Config().max_chain_depth

    def log(self, msg: str) -> None:
        self.console.log(msg)

    # -- daemon state ---------------------------------------------------------------------

    def _branch_mounts(self) -> int:
        prefix = str(self.mnt_dir) + "/"
        with open("/proc/self/mountinfo") as f:
            return sum(1 for line in f if line.split()[4].startswith(prefix))

    def settle(self, timeout: float = 5.0) -> int:
        """Wait for the daemon's background work (standbys being built, old branches
        retired): the number of branch mounts steady for 100 ms. Returns it."""
        deadline = time.monotonic() + timeout
        last, steady = -1, 0
        while time.monotonic() < deadline:
            n = self._branch_mounts()
            steady = steady + 1 if n == last else 0
            last = n
            if steady >= 4:
                break
            time.sleep(0.025)
        else:
            self.unsettled += 1
        time.sleep(self.plan.pause_s)
        return last

    def settle_quiet(self) -> None:
        pause, self.plan.pause_s = self.plan.pause_s, 0.0
        unsettled = self.unsettled
        try:
            self.settle()
        finally:
            self.plan.pause_s, self.unsettled = pause, unsettled

    def step(self, sbx, tree: Tree, k: int, seed: int) -> None:
        paths = pick_files(tree, k, seed)
        r = sbx.exec(["sh", "-c", STEP_SCRIPT], stdin="\n".join(paths) + "\n",
                     env={"S": str(seed)})
        if r.exit_code != 0:
            raise RuntimeError(f"step failed ({r.exit_code}): {r.stderr[-500:]!r}")

    def record(self, **row) -> dict:
        self.results.append(row)
        return row

    # -- measurements -----------------------------------------------------------------------

    def rpc_totals(self, client, method: str) -> tuple[float, int]:
        """(sum of seconds, count) of successful `method` calls, as the daemon's RPC
        interceptor timed them (Stats' Prometheus histogram)."""
        total, count = 0.0, 0
        tag = f'method="{method}"'
        for line in client.stats().prometheus_text.splitlines():
            if tag in line and 'code="OK"' in line:
                if line.startswith("deltabox_rpc_seconds_sum{"):
                    total = float(line.rsplit(" ", 1)[1])
                elif line.startswith("deltabox_rpc_seconds_count{"):
                    count = int(float(line.rsplit(" ", 1)[1]))
        return total, count

    def timed(self, client, method: str, fn):
        """(result, client wall ms, daemon handler ms or None) of one RPC."""
        s0 = self.rpc_totals(client, method)
        t0 = time.perf_counter()
        res = fn()
        wall = 1000 * (time.perf_counter() - t0)
        s1 = self.rpc_totals(client, method)
        handler = 1000 * (s1[0] - s0[0]) if s1[1] - s0[1] == 1 else None
        return res, wall, handler

    def build_chain(self, client, sbx, tree: Tree) -> tuple[dict[int, object], "Cell"]:
        """c0 (the sandbox as created) and c1..c_max, a 10-file step each; waits for
        the standby and for squashes, as an agent whose steps take a while would."""
        depth_max = max(self.plan.depths)
        chain = {0: sbx.checkpoint("c0")}
        cell = Cell()
        for d in range(1, depth_max + 1):
            self.step(sbx, tree, STEP_FILES_CHAIN, seed=10_000 + d)
            info, wall, handler = self.timed(client, "Checkpoint",
                                             lambda: sbx.checkpoint(f"c{d}"))
            cell.add(wall, handler, info.timings_ms)
            chain[d] = info
            self.settle_quiet()
            if len(info.layer_ids) > self.max_chain_depth:
                t0 = time.monotonic()
                chain[d] = self._wait_squashed(sbx, info.id)
                self.squashes.append({"tree": tree.name, "depth": d,
                                      "chain_layers": len(info.layer_ids),
                                      "tree_files": len(tree.files),
                                      "seconds": round(time.monotonic() - t0, 2)})
                self.log(f"  squash of a {len(info.layer_ids)}-layer chain at depth {d}: "
                         f"{self.squashes[-1]['seconds']} s (background, waited)")
            if d % 10 == 0:
                self.log(f"  chain depth {d}/{depth_max}")
        return chain, cell

    def _wait_squashed(self, sbx, ckpt_id: str, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for c in sbx.checkpoints():
                if c.id == ckpt_id and len(c.layer_ids) <= self.max_chain_depth:
                    return c
            time.sleep(0.05)
        raise RuntimeError(f"checkpoint {ckpt_id} was not squashed within {timeout} s")

    def measure_floor(self, client, sbx, tree: Tree) -> None:
        """The cheapest RPC (GetSandbox: one SQLite read) -- the gRPC floor."""
        cell = Cell()
        for _ in range(max(20, self.plan.iterations)):
            _, wall, handler = self.timed(client, "GetSandbox", lambda: client.get(sbx.id))
            cell.add(wall, handler, {})
        self.record(**cell.row(op="GetSandbox (gRPC floor)", tree=tree.name, step_files=None,
                               depth=None, mount_layers=None, n=None))

    def measure_checkpoint(self, client, sbx, tree: Tree, depth: int, base, k: int) -> None:
        n = self.plan.n_checkpoint(k)
        cell, prev = Cell(), None
        for i in range(n):
            sbx.rollback(base.id)
            if prev is not None:
                client.delete_checkpoint(prev)
            self.step(sbx, tree, k, seed=k * 1000 + i)
            self.settle()
            info, wall, handler = self.timed(client, "Checkpoint", sbx.checkpoint)
            cell.add(wall, handler, info.timings_ms)
            prev = info.id
        sbx.rollback(base.id)
        client.delete_checkpoint(prev)
        self.record(**cell.row(op="checkpoint", tree=tree.name, step_files=k, depth=depth,
                               mount_layers=len(base.layer_ids) + 1, n=None))

    def measure_rollback(self, client, sbx, tree: Tree, depth: int, base, older) -> None:
        for fresh in (False, True):
            n = self.plan.n_rollback(fresh)
            cell = Cell()
            for i in range(n):
                target = (older if i % 2 == 0 else base) if fresh else base
                self.step(sbx, tree, 10, seed=500_000 + i)
                self.settle()
                res, wall, handler = self.timed(client, "Rollback",
                                                lambda: sbx.rollback(target.id))
                cell.add(wall, handler, res.timings_ms, res.path)
            if fresh and n % 2 == 1:
                sbx.rollback(base.id)
            self.record(**cell.row(op="rollback " + ("fresh" if fresh else "standby"),
                                   tree=tree.name, step_files=10, depth=depth,
                                   mount_layers=len(base.layer_ids), n=None))

    def measure_fork(self, client, tree: Tree, depth: int, base) -> None:
        from deltabox.errors import DeltaboxError
        with ThreadPoolExecutor(4) as pool:
            for n_children in self.plan.forks:
                for warm in (False, True) if self.warm_api else (False,):
                    n = self.plan.n_fork(n_children)
                    cell = Cell()
                    try:
                        for _ in range(n):
                            if warm:
                                client.warm(base.id, n_children, wait=True)
                            self.settle()
                            children, wall, handler = self.timed(
                                client, "Fork", lambda: client.fork(base.id, n_children))
                            cell.add(wall, handler, children.timings_ms)
                            cell.failed += sum(1 for c in children if c.sandbox is None)
                            list(pool.map(lambda c: c.sandbox.destroy(),
                                          [c for c in children if c.sandbox is not None]))
                    except DeltaboxError as e:
                        if not warm:
                            raise
                        self.warm_api = False
                        self.plan.notes.append(f"warm forks skipped: Warm failed ({e})")
                        continue
                    self.record(**cell.row(op=f"fork {n_children}" + (" (warm)" if warm else ""),
                                           tree=tree.name, step_files=None, depth=depth,
                                           mount_layers=len(base.layer_ids), n=n_children))

    def baseline(self, tree: Tree, scratch: Path) -> None:
        n = self.plan.n_baseline(len(tree.files))
        src = tree.work
        dst = scratch / "copy"
        archive = scratch / "tree.tar"

        def clean() -> None:
            subprocess.run(["rm", "-rf", str(dst)], check=True)
            subprocess.run(["sync", "-f", str(scratch)], check=False)

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - t0)

        ops = {
            "shutil.copytree": lambda: shutil.copytree(src, dst, symlinks=True),
            "cp -a --reflink=always": lambda: subprocess.run(
                ["cp", "-a", "--reflink=always", str(src), str(dst)], check=True),
            "tar c (archive)": lambda: subprocess.run(
                ["tar", "cf", str(archive), "-C", str(src), "."], check=True),
            "tar x (restore)": lambda: (dst.mkdir(), subprocess.run(
                ["tar", "xf", str(archive), "-C", str(dst)], check=True)),
        }
        scratch.mkdir(parents=True, exist_ok=True)
        for name, fn in ops.items():
            samples = []
            for _ in range(n):
                clean()
                if name.startswith("tar c"):
                    archive.unlink(missing_ok=True)
                time.sleep(self.plan.pause_s)
                samples.append(timed(fn))
            self.baselines.append({"op": name, "tree": tree.name, "iterations": n,
                                   "ms": summary(samples)})
            self.log(f"  {name}: p50 {pct(samples, 50):.0f} ms")
        clean()
        archive.unlink(missing_ok=True)

    # -- driver ---------------------------------------------------------------------------

    def run_tree(self, client, spec: str, base: Path, tiny_tar: Path) -> None:
        self.log(f"[bold]tree {spec}[/]: preparing")
        tree = prepare_tree(spec, base / f"stage-{len(self.trees)}", tiny_tar, self.log)
        self.trees.append(tree)
        self.log(f"  {len(tree.files):,} files, {tree.dirs:,} dirs, "
                 f"{tree.bytes / 2**20:.0f} MiB from {', '.join(tree.sources)}")
        self.log("  baselines: copytree, cp --reflink, tar")
        self.baseline(tree, base / f"baseline-{len(self.trees)}")
        image = f"bench-{len(self.trees)}"
        t0 = time.perf_counter()
        client.import_image(image, tree.stage)
        self.log(f"  imported as image {image} in {time.perf_counter() - t0:.1f} s")
        self.warm_api = hasattr(client, "warm")
        sbx = client.create(image, name=f"bench-{len(self.trees)}")
        try:
            self.measure_floor(client, sbx, tree)
            t0 = time.perf_counter()
            chain, cell = self.build_chain(client, sbx, tree)
            d_max = max(self.plan.depths)
            self.record(**cell.row(op="checkpoint (chain build)", tree=tree.name,
                                   step_files=STEP_FILES_CHAIN, depth=f"1-{d_max}",
                                   mount_layers=None, n=None))
            self.log(f"  chain of {d_max} checkpoints built in "
                     f"{time.perf_counter() - t0:.1f} s")
            for depth in self.plan.depths:
                c, older = chain[depth], chain[depth - 1]
                self.log(f"  depth {depth} ({len(c.layer_ids)} mounted layers): checkpoint")
                sbx.rollback(c.id)
                for k in self.plan.steps:
                    self.measure_checkpoint(client, sbx, tree, depth, c, k)
                self.log(f"  depth {depth}: rollback")
                self.measure_rollback(client, sbx, tree, depth, c, older)
                self.log(f"  depth {depth}: fork")
                self.measure_fork(client, tree, depth, c)
        finally:
            sbx.destroy()
            left = self.settle()
            if left:
                self.leaks.append({"tree": tree.name, "branch_mounts_left": left})
                self.log(f"  [red]{left} branch mount(s) left after destroying the only "
                         "sandbox (leaked incarnations)[/]")

    def run(self) -> dict:
        from deltabox.client import Client
        from deltabox.demo import _start_daemon
        if os.geteuid() != 0:
            raise SystemExit("deltabox bench runs its own daemon, which needs root")
        tiny_tar = CACHE / "images" / "tiny.tar"
        if not tiny_tar.exists():
            raise SystemExit(f"{tiny_tar} is missing: run `make setup` (native/setup-host.sh)")
        started = time.time()
        load0 = os.getloadavg()
        base = Path(tempfile.mkdtemp(prefix="deltabox-bench-"))
        state = base / "state"
        state.mkdir()
        proc = None
        try:
            self.log(f"starting a daemon on {state}")
            proc = _start_daemon(state)
            self.mnt_dir = state / "store" / "mnt"
            work = state / "store" / "bench"  # same XFS as the layers, unknown to the daemon
            with Client(state / "deltabox.sock") as client:
                st = client.status()
                backing = st.store_backing
                for spec in self.plan.trees:
                    self.run_tree(client, spec, work, tiny_tar)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            left = _cleanup_leftovers(state)
            if left:
                self.plan.notes.append(f"cleaned up after the daemon: {left}")
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)
        doc = {
            "benchmark": "deltabox bench fs",
            "version": 1,
            "code": _revision(),
            "host": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                     "loadavg_start": [round(x, 2) for x in load0],
                     "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                     "store_backing": backing},
            "config": {"quick": self.plan.quick, "iterations": self.plan.iterations,
                       "trees": self.plan.trees, "steps": list(self.plan.steps),
                       "depths": list(self.plan.depths), "forks": list(self.plan.forks),
                       "max_chain_depth": self.max_chain_depth},
            "trees": [t.info() for t in self.trees],
            "results": self.results,
            "baselines": self.baselines,
            "squashes": self.squashes,
            "leaks": self.leaks,
        }
        doc["ratios"] = ratios(doc)
        doc["targets"] = targets(doc)
        notes = list(self.plan.notes)
        if self.unsettled:
            notes.append(f"{self.unsettled} timed operations started before the daemon's "
                         "background work had settled (5 s timeout)")
        for lk in self.leaks:
            notes.append(f"daemon bug: {lk['branch_mounts_left']} branch mount(s) (with their "
                         f"inits and cgroups) were left after the {lk['tree']} run destroyed its "
                         "only sandbox: leaked standby incarnations")
        doc["notes"] = notes
        doc["elapsed_s"] = round(time.time() - started, 1)
        return doc


def _cleanup_leftovers(state: Path) -> str:
    """Kill sandbox inits, remove cgroups and unmount what the stopped daemon left
    under `state` (leaked incarnations); returns what was done, '' if nothing."""
    from deltabox import _linux
    killed, cgroups = [], set()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if b"deltabox-init" not in (pid_dir / "cmdline").read_bytes():
                continue
            if str(state) not in (pid_dir / "mountinfo").read_text():
                continue
            for line in (pid_dir / "cgroup").read_text().splitlines():
                ctrl, path = line.split(":", 2)[1:]
                if "/deltabox/" in path:
                    for c in ctrl.split(","):
                        cgroups.add(Path("/sys/fs/cgroup") / c.removeprefix("name=") /
                                    path.lstrip("/") if c else
                                    Path("/sys/fs/cgroup") / path.lstrip("/"))
            os.kill(int(pid_dir.name), 9)
            killed.append(int(pid_dir.name))
        except (OSError, ValueError):
            continue
    deadline = time.monotonic() + 5
    while killed and time.monotonic() < deadline and any(
            Path(f"/proc/{p}").exists() and "Z" not in _proc_state(p) for p in killed):
        time.sleep(0.05)
    cgroups |= {c.parent for c in cgroups}  # the daemon instance's parent
    removed = 0
    for c in sorted(cgroups, key=lambda p: len(p.parts), reverse=True):
        for _ in range(50):
            try:
                c.rmdir()
                removed += 1
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
    mounts = sorted(_linux.mounts_under(state), key=len, reverse=True)
    for m in mounts:
        subprocess.run(["umount", m], capture_output=True)
        if _linux.is_mountpoint(m):
            subprocess.run(["umount", "-l", m], capture_output=True)
    leftover_mounts = [m for m in mounts if not m.endswith("/store")]
    if not killed and not leftover_mounts:
        return ""
    return (f"killed {len(killed)} sandbox init(s), removed {removed} cgroup(s), "
            f"unmounted {len(leftover_mounts)} branch mount(s)")


def _revision() -> str:
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


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


# ---- analysis ------------------------------------------------------------------------------

def _find(doc: dict, op: str, tree: str, **kw) -> dict | None:
    for r in doc["results"]:
        if r["op"] == op and r["tree"] == tree and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _baseline(doc: dict, op: str, tree: str) -> dict | None:
    for b in doc["baselines"]:
        if b["op"] == op and b["tree"] == tree:
            return b
    return None


def ratios(doc: dict) -> list[dict]:
    """How many times faster than each baseline (baseline p50 / ours p50, daemon)."""
    out = []
    for t in doc["trees"]:
        name = t["name"]
        d0 = doc["config"]["depths"][0]
        ck = _find(doc, "checkpoint", name, step_files=10, depth=d0)
        rb = _find(doc, "rollback standby", name, depth=d0)
        fk = _find(doc, "fork 16", name, depth=d0)
        for b in doc["baselines"]:
            if b["tree"] != name:
                continue
            row = {"tree": name, "baseline": b["op"], "baseline_p50_ms": b["ms"]["p50"]}
            if ck:
                row["vs_checkpoint_10_files"] = round(b["ms"]["p50"] / ck["daemon_ms"]["p50"], 1)
                row["vs_checkpoint_10_files_grpc"] = round(
                    b["ms"]["p50"] / ck["grpc_ms"]["p50"], 1)
            if rb:
                row["vs_rollback_standby"] = round(b["ms"]["p50"] / rb["daemon_ms"]["p50"], 1)
            if fk:  # 16 copies of the tree vs one fork of 16
                row["vs_fork_16"] = round(16 * b["ms"]["p50"] / fk["daemon_ms"]["p50"], 1)
            out.append(row)
    return out


def targets(doc: dict) -> list[dict]:
    res = doc["results"]
    out = []

    def worst(rows: list[dict]) -> tuple[float | None, str]:
        if not rows:
            return None, ""
        r = max(rows, key=lambda r: r["daemon_ms"]["p50"])
        b = min(rows, key=lambda r: r["daemon_ms"]["p50"])
        where = f"worst {r['tree']} depth {r['depth']}"
        if len(rows) > 1:
            where += f"; best {b['daemon_ms']['p50']:.2f} ({b['tree']} depth {b['depth']})"
        where += f"; gRPC p50 {min(x['grpc_ms']['p50'] for x in rows):.2f}.." \
                 f"{max(x['grpc_ms']['p50'] for x in rows):.2f}"
        return r["daemon_ms"]["p50"], where

    def add(name: str, limit: str, value, where: str, met) -> None:
        out.append({"target": name, "limit": limit, "value": value, "where": where,
                    "status": "n/a" if met is None else ("met" if met else "NOT met")})

    v, where = worst([r for r in res if r["op"] == "checkpoint" and r["step_files"] == 10])
    add("checkpoint of a 10-file step, p50 in the daemon (worst tree/depth)",
        f"<= {TARGETS_MS['checkpoint']} ms", v, where,
        None if v is None else v <= TARGETS_MS["checkpoint"])
    rb = [r for r in res if r["op"] == "rollback standby"]
    v, where = worst(rb)
    add("rollback (standby path), p50 in the daemon (worst tree/depth)",
        f"<= {TARGETS_MS['rollback']} ms", v, where,
        None if v is None else v <= TARGETS_MS["rollback"])
    v, where = worst([r for r in res if r["op"] == "fork 16"])
    add("fork of 16 (plain Fork), p50 in the daemon (worst tree/depth)",
        f"<= {TARGETS_MS['fork16']} ms", v, where,
        None if v is None else v <= TARGETS_MS["fork16"])
    warm = [r for r in res if r["op"] == "fork 16 (warm)"]
    if warm:
        v, where = worst(warm)
        add("  the same after Warm(16) (pool ready before the Fork)",
            f"<= {TARGETS_MS['fork16']} ms", v, where, v <= TARGETS_MS["fork16"])
    # >= 50x faster than copytree on the smallest tree with >= 2,000 files.
    small = sorted((t for t in doc["trees"] if t["files"] >= SMALL_TREE_FILES),
                   key=lambda t: t["files"])
    if small:
        t = small[0]
        r = next((r for r in doc["ratios"] if r["tree"] == t["name"]
                  and r["baseline"] == "shutil.copytree"), None)
        vals = [r[k] for k in ("vs_checkpoint_10_files", "vs_rollback_standby")
                if r and k in r]
        v = min(vals) if vals else None
        add("faster than shutil.copytree (min of checkpoint and rollback, daemon p50)",
            f">= {COPYTREE_SPEEDUP:.0f}x", v, f"{t['name']} ({t['files']:,} files)",
            None if v is None else v >= COPYTREE_SPEEDUP)
    else:
        add("faster than shutil.copytree (min of checkpoint and rollback, daemon p50)",
            f">= {COPYTREE_SPEEDUP:.0f}x", None, f"no tree with >= {SMALL_TREE_FILES:,} files",
            None)
    # Flat: the slowest (tree, depth) standby rollback within 1.5x + 0.5 ms of the fastest.
    if len(rb) >= 2:
        p50s = [r["daemon_ms"]["p50"] for r in rb]
        lo, hi = min(p50s), max(p50s)
        add("rollback flat in tree size and chain depth (standby p50: max vs min)",
            "max <= 1.5 x min + 0.5 ms", round(hi / lo, 2) if lo else None,
            f"{lo:.2f}..{hi:.2f} ms over {len(rb)} tree/depth cells", hi <= 1.5 * lo + 0.5)
    else:
        add("rollback flat in tree size and chain depth", "max <= 1.5 x min + 0.5 ms", None,
            "needs two trees or depths", None)
    return out


# ---- output --------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


_BREAKDOWN_ORDER = ["freeze_ms", "copy_ms", "thaw_ms", "frozen_ms", "sink_ms", "commit_ms",
                    "kill_ms"]


def render(doc: dict, console) -> None:
    from rich.table import Table
    trees = Table("tree", "files", "dirs", "MiB", "sources", title="trees (under /work of "
                  "the busybox rootfs)", box=None, header_style="bold")
    for t in doc["trees"]:
        trees.add_row(t["name"], f"{t['files']:,}", f"{t['dirs']:,}",
                      f"{t['bytes'] / 2**20:.0f}", ", ".join(t["sources"]))
    console.print(trees)

    tab = Table("operation", "tree", "step", "depth", "layers", "iters", "daemon p50",
                "daemon p95", "handler p50", "gRPC p50", "gRPC p95",
                "daemon breakdown p50 / notes", title="DeltaFS (ms)", box=None,
                header_style="bold")
    for r in doc["results"]:
        parts = r.get("breakdown_p50_ms", {})
        order = [k for k in _BREAKDOWN_ORDER if k in parts] + sorted(
            k for k in parts if k not in _BREAKDOWN_ORDER)
        extra = " ".join(f"{k.removesuffix('_ms')} {parts[k]:.2f}" for k in order)
        if r.get("paths"):
            extra = (extra + "; " if extra else "") + "paths " + ", ".join(
                f"{k} {v}" for k, v in r["paths"].items())
        if r.get("failed_children"):
            extra += f"; {r['failed_children']} children FAILED"
        d, h, g = r["daemon_ms"] or {}, r["handler_ms"] or {}, r["grpc_ms"]
        tab.add_row(r["op"], r["tree"], _fmt(r["step_files"]), _fmt(r["depth"]),
                    _fmt(r["mount_layers"]), str(r["iterations"]), _fmt(d.get("p50")),
                    _fmt(d.get("p95")), _fmt(h.get("p50")), _fmt(g["p50"]), _fmt(g["p95"]),
                    extra)
    console.print(tab)

    bl = Table("baseline (host, same XFS)", "tree", "iters", "p50 ms", "p95 ms", title="baselines",
               box=None, header_style="bold")
    for b in doc["baselines"]:
        bl.add_row(b["op"], b["tree"], str(b["iterations"]), _fmt(b["ms"]["p50"]),
                   _fmt(b["ms"]["p95"]))
    console.print(bl)

    d0 = doc["config"]["depths"][0]
    rt = Table("tree", "baseline", "baseline p50 ms", "÷ checkpoint 10 files",
               "÷ checkpoint (gRPC)", "÷ rollback standby", "16 × baseline ÷ fork 16",
               title=f"speed-up: baseline p50 / DeltaFS p50 (daemon, depth {d0})", box=None,
               header_style="bold")
    for r in doc["ratios"]:
        rt.add_row(r["tree"], r["baseline"], _fmt(r["baseline_p50_ms"]),
                   *(f"{r[k]:,.0f}x" if k in r else "-" for k in (
                       "vs_checkpoint_10_files", "vs_checkpoint_10_files_grpc",
                       "vs_rollback_standby", "vs_fork_16")))
    console.print(rt)

    if doc["squashes"]:
        sq = Table("tree", "at depth", "chain layers", "seconds", title="background squashes "
                   "while building the chains", box=None, header_style="bold")
        for s in doc["squashes"]:
            sq.add_row(s["tree"], str(s["depth"]), str(s["chain_layers"]), _fmt(s["seconds"]))
        console.print(sq)

    tg = Table("target", "limit", "measured", "where", "status", title="targets", box=None,
               header_style="bold")
    for t in doc["targets"]:
        style = {"met": "green", "NOT met": "bold red"}.get(t["status"], "yellow")
        tg.add_row(t["target"], t["limit"], _fmt(t["value"]), t["where"],
                   f"[{style}]{t['status']}[/]")
    console.print(tg)
    for n in doc["notes"]:
        console.print(f"note: {n}")
    host = doc["host"]
    console.print(f"code {doc.get('code') or '?'}; host: {host['cpus']} CPUs, kernel "
                  f"{host['kernel']}, load {host['loadavg_start'][0]} -> "
                  f"{host['loadavg_end'][0]} (1-min average; other work on the host shows here); "
                  f"total {doc['elapsed_s']} s")


def main_fs(args) -> int:
    from rich.console import Console
    json_out = bool(getattr(args, "json", False))
    if args.iterations is not None and args.iterations < 1:
        raise SystemExit("--iterations must be >= 1")
    # Progress goes to stderr, so that --json leaves stdout a clean document.
    console = Console(stderr=True)
    plan = make_plan(args.quick, args.iterations, args.tree)
    doc = Bench(plan, console, json_out).run()
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render(doc, Console(width=None if sys.stdout.isatty() else 200))
    return 0
