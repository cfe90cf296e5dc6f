"""`deltabox bench fs`: DeltaFS checkpoint, rollback and fork on real source trees,
against what users do today on the same tree (`shutil.copytree`, `cp -a
--reflink=always`, tar), measured in the same run with the same sample count.

How it measures
---------------
* A throw-away daemon (`deltabox.testing.ThrowawayDaemon`) on a loop-backed XFS store;
  trees (`deltabox.bench.trees`) are put under /work of the busybox rootfs and
  imported as an image. Baselines run on the host, on the same XFS, warm page cache.
* A "step that changes k files" is an exec appending a line to k files of the tree.
* Chain depth d: the sandbox takes checkpoints c1..c100 (a 10-file step each, waiting
  for background squashes). "At depth d" means on top of c_d.
* Rollback rows, all after a 10-file step:
  - "rollback standby (best case)": back to the latest checkpoint once the daemon has
    prepared the standby incarnation for it;
  - "rollback right after checkpoint": a checkpoint, a step, and at once back to it
    (the standby is not ready yet: what a failing action sees);
  - "rollback to non-head": alternately to c_d and c_(d-1), never the standby's target.
* Fork(n) of c_d: until the RPC returns (all n children's inits run). "fork n (warm)"
  is the Fork after Warm(n, wait=True) (best case: the pool was warmed while the caller
  did something else); "fork n incl. Warm" adds the Warm call's own time.
* Three times per operation: "gRPC" the client's wall time (what targets are judged
  on), "daemon" its timings_ms["total_ms"], "handler" its RPC interceptor's time.
* Before each timed operation the bench waits for the daemon's background work (its
  branch mounts steady for 100 ms), then 100 ms more -- except where the row says
  "right after".
"""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deltabox.bench.common import CACHE, Cell, DaemonBench, run_main, timed_ms
from deltabox.bench.fs_report import (ROLLBACK_BEST, ROLLBACK_EARLY, ROLLBACK_NON_HEAD,
                                      fs_ratios, fs_targets, render_fs)
from deltabox.bench.trees import STEP_SCRIPT, Tree, pick_files, prepare_tree
from deltabox.stats import percentile, summary

__all__ = ["FSBench", "Plan", "make_plan", "main_fs"]

STEP_FILES_CHAIN = 10          # files changed per step while building the chain


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

    def n_baseline(self) -> int:
        """As many samples as DeltaFS's checkpoints and rollbacks (issue 14, item 5)."""
        return self.iterations


def make_plan(quick: bool, iterations: int | None, trees: list[str] | None) -> Plan:
    if quick:
        plan = Plan(trees=trees or ["django"], steps=(10, 100), depths=(1, 10), forks=(1, 16),
                    iterations=iterations or 5, quick=True)
    else:
        plan = Plan(trees=trees or ["django", "mono"], iterations=iterations or 20)
    it = plan.iterations
    plan.notes.append(
        f"iterations: {it} for checkpoints of 1/10/100-file steps, standby rollbacks, rollbacks "
        f"right after a checkpoint and every baseline; {max(3, it // 2)} for 1,000-file steps, "
        f"non-head rollbacks and fork(1/4/16) cold and pre-warmed; fork(64) {max(2, it // 6)}. "
        "p95 of few samples lies between the two largest.")
    return plan


class FSBench(DaemonBench):
    benchmark = "deltabox bench fs"

    def __init__(self, plan: Plan, console, json_out: bool):
        super().__init__(plan, console, json_out)
        self.trees: list[Tree] = []
        self.squashes: list[dict] = []
        self.warm_api = False
        from deltabox.config import Config
        self.max_chain_depth = Config().max_chain_depth

    # -- daemon state ---------------------------------------------------------------------

    def settle(self, timeout: float = 5.0) -> int:
        """Wait for the daemon's background work (standbys being built, old branches
        retired): the number of branch mounts steady for 100 ms. Returns it."""
        deadline = time.monotonic() + timeout
        last, steady = -1, 0
        while time.monotonic() < deadline:
            n = self.view.branch_mounts()
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

    # -- measurements -----------------------------------------------------------------------

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
            self.record(**cell.row(op=ROLLBACK_NON_HEAD if fresh else ROLLBACK_BEST,
                                   tree=tree.name, step_files=10, depth=depth,
                                   mount_layers=len(base.layer_ids), n=None))

    def measure_rollback_early(self, client, sbx, tree: Tree, depth: int, base) -> None:
        """A checkpoint on top of c_d, a step, and at once back to it: an action that
        failed fast, before the daemon prepared that checkpoint's standby."""
        n = self.plan.n_rollback(False)
        cell = Cell()
        for i in range(n):
            self.settle()
            ck = sbx.checkpoint(f"early{i}")
            self.step(sbx, tree, 10, seed=700_000 + i)
            res, wall, handler = self.timed(client, "Rollback", lambda: sbx.rollback(ck.id))
            cell.add(wall, handler, res.timings_ms, res.path)
            self.settle_quiet()
            sbx.rollback(base.id)
            client.delete_checkpoint(ck.id)
        self.record(**cell.row(op=ROLLBACK_EARLY, tree=tree.name, step_files=10, depth=depth,
                               mount_layers=len(base.layer_ids) + 1, n=None))

    def measure_fork(self, client, tree: Tree, depth: int, base) -> None:
        from deltabox.errors import DeltaboxError
        with ThreadPoolExecutor(4) as pool:
            for n_children in self.plan.forks:
                for warm in (False, True) if self.warm_api else (False,):
                    n = self.plan.n_fork(n_children)
                    cell, with_warm, warm_ms = Cell(), Cell(), []
                    try:
                        for _ in range(n):
                            if warm:
                                self.settle()
                                _, w = timed_ms(lambda: client.warm(base.id, n_children,
                                                                    wait=True))
                                warm_ms.append(w)
                            self.settle()
                            children, wall, handler = self.timed(
                                client, "Fork", lambda: client.fork(base.id, n_children))
                            cell.add(wall, handler, children.timings_ms)
                            if warm:  # what a caller that waits for Warm pays in all
                                with_warm.add(warm_ms[-1] + wall, None, {})
                            cell.failed += sum(1 for c in children if c.sandbox is None)
                            list(pool.map(lambda c: c.sandbox.destroy(),
                                          [c for c in children if c.sandbox is not None]))
                    except DeltaboxError as e:
                        if not warm:
                            raise
                        self.warm_api = False
                        self.plan.notes.append(f"warm forks skipped: Warm failed ({e})")
                        continue
                    keys = dict(tree=tree.name, step_files=None, depth=depth,
                                mount_layers=len(base.layer_ids), n=n_children)
                    row = self.record(**cell.row(
                        op=f"fork {n_children}" + (" (warm)" if warm else ""), **keys))
                    if warm:
                        row["warm_ms"] = summary(warm_ms)
                        self.record(**with_warm.row(op=f"fork {n_children} incl. Warm",
                                                    **keys))

    def baseline(self, tree: Tree, scratch: Path) -> None:
        n = self.plan.n_baseline()
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
            self.log(f"  {name}: p50 {percentile(samples, 50):.0f} ms")
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
            self.measure_floor(client, sbx, tree=tree.name, step_files=None, depth=None,
                               mount_layers=None, n=None)
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
                self.measure_rollback_early(client, sbx, tree, depth, c)
                self.log(f"  depth {depth}: fork")
                self.measure_fork(client, tree, depth, c)
        finally:
            sbx.destroy()
            left = self.settle()
            if left:
                self.leaks.append({"tree": tree.name, "branch_mounts_left": left})
                self.log(f"  [red]{left} branch mount(s) left after destroying the only "
                         "sandbox (leaked incarnations)[/]")

    def preflight(self) -> None:
        self.tiny_tar = CACHE / "images" / "tiny.tar"
        if not self.tiny_tar.exists():
            raise SystemExit(f"{self.tiny_tar} is missing: run `make setup` "
                             "(native/setup-host.sh)")

    def body(self, client, work: Path) -> None:
        for spec in self.plan.trees:
            self.run_tree(client, spec, work, self.tiny_tar)

    def document(self) -> dict:
        return {
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

    def analyse(self, doc: dict) -> None:
        notes = doc.pop("notes")
        doc["ratios"] = fs_ratios(doc)
        doc["targets"] = fs_targets(doc)
        if self.unsettled:
            notes.append(f"{self.unsettled} timed operations started before the daemon's "
                         "background work had settled (5 s timeout)")
        for lk in self.leaks:
            notes.append(f"daemon bug: {lk['branch_mounts_left']} branch mount(s) (with their "
                         f"inits and cgroups) were left after the {lk['tree']} run destroyed its "
                         "only sandbox: leaked standby incarnations")
        doc["notes"] = notes


def main_fs(args) -> int:
    return run_main(args, make_plan(args.quick, args.iterations, args.tree), FSBench, render_fs)
