"""`deltabox bench cr`: DeltaCR on a demo-image sandbox whose Python session holds
10 / 100 / 1000 MB, against plain CRIU on the same sandbox (`cr_baseline.py`).

Per state X MB (os.urandom: incompressible), on one sandbox with a bash and a Python
session:
* "exec true (idle)": the cheapest call into the sandbox, for scale.
* checkpoint (full): an agent step (the shell appends to /root/notes.txt, Python bumps a
  counter), then Checkpoint(full). Alternate iterations time the call an agent makes
  next: "exec right after checkpoint returns" (it competes with the body double being
  restored) and "exec issued during checkpoint" (the moment the cgroup starts freezing:
  it waits at the daemon's gate). "double ready" = from the Checkpoint's return until
  the new body double is restored.
* rollback (double) -- best case: a step, then back to the head once its double is ready.
* rollback right after checkpoint: a checkpoint, a step, and at once back to it, before
  the double is ready (the daemon waits for it).
* rollback (restore): alternately to the previous checkpoint (non-head) and back to the
  head: never the double's target, so CRIU restores from the store.
* fork N (cold): Fork(head, N) until every child runs; its own CPU (daemon + CRIU +
  sandboxes, from the daemon's accounting cgroup) beside the wall time. fork N
  (pre-warmed): Warm(head, N, wait=True), then Fork; "incl. Warm" adds Warm's time.
* baselines (cr_baseline.py): plain criu dump / criu restore + the changed files, and
  the whole-root copytree as a second, labelled baseline.
* memory per double (cr_memory.py; not with --quick): 1 and 8 body doubles of a 100 MB
  sandbox, with and without KSM, each on a daemon of its own: cgroup memory and Pss.
Before each timed operation (except the "right after" ones) the bench waits until the
daemon is idle -- no criu child, branch mounts and frozen cgroups steady, the expected
doubles ready, its CPU flat for 100 ms -- then 100 ms more. Every Python-session state is
checked after each kind of rollback (the counter the checkpoint held).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deltabox.bench.common import CACHE, Cell, DaemonBench, run_main, timed_ms
from deltabox.bench.cr_baseline import PlainCriuBaseline
from deltabox.bench.cr_memory import memory_per_double, render_memory
from deltabox.bench.cr_report import cr_ratios, cr_result_notes, cr_targets, render_cr
from deltabox.stats import percentile, summary

__all__ = ["CRBench", "CRPlan", "make_cr_plan", "main_cr"]


@dataclass
class CRPlan:
    rss_mb: tuple[int, ...] = (10, 100, 1000)
    fork_rss_mb: tuple[int, ...] = (10, 100)   # 64 children of 1000 MB do not fit
    forks: tuple[int, ...] = (1, 4, 16, 64)
    iterations: int = 20
    quick: bool = False
    pause_s: float = 0.1
    # memory per double: a sandbox of this state (0 = not measured: --quick; measure it alone
    # with `python -m deltabox.bench.cr_memory`)
    memory_mb: int = 100
    notes: list[str] = field(default_factory=list)

    def n(self, op: str, mb: int, children: int = 0) -> int:
        it, big = self.iterations, mb >= 1000
        if op == "checkpoint":
            return max(3, it // 4) if big else it
        if op == "double":
            return max(3, it // 2) if big else it
        if op == "restore":
            return max(2, it // 5) if big else max(3, it // 2)
        if op == "fork":
            return max(2, it // 10) if children >= 64 else max(2, it // 4)
        if op == "baseline":  # as many as the rollbacks via the double (issue 14, item 5)
            return self.n("double", mb)
        return max(10, it)  # exec, GetSandbox


def make_cr_plan(quick: bool, iterations: int | None) -> CRPlan:
    if quick:
        plan = CRPlan(rss_mb=(10,), fork_rss_mb=(10,), forks=(1, 16),
                      iterations=iterations or 5, quick=True, memory_mb=0)
    else:
        plan = CRPlan(iterations=iterations or 20)
    parts = []
    for mb in plan.rss_mb:
        parts.append(f"{mb} MB: checkpoint {plan.n('checkpoint', mb)} (half with the exec right "
                     f"after, half with the exec during), rollback double "
                     f"{plan.n('double', mb)}, restore {plan.n('restore', mb)}, baseline "
                     f"{plan.n('baseline', mb)}")
    forks = ", ".join(f"fork {k}: {plan.n('fork', 0, k)} cold + {plan.n('fork', 0, k)} "
                      "pre-warmed" for k in plan.forks)
    plan.notes.append("iterations: " + "; ".join(parts) + f"; {forks}. p95 of few samples "
                      "lies between the two largest.")
    big = [mb for mb in plan.rss_mb if mb not in plan.fork_rss_mb]
    if big:
        plan.notes.append(f"forks only for the {'/'.join(map(str, plan.fork_rss_mb))} MB "
                          f"states: {max(plan.forks)} children of {big[0]} MB (plus the pool of "
                          "doubles before them) would not fit in this VM's memory")
    return plan


class CRBench(DaemonBench):
    benchmark = "deltabox bench cr"
    # Mechanisms, not policy: only the head keeps a double, built after every full
    # checkpoint, so "rollback (restore)" finds its targets cold. `deltabox bench tree`
    # measures the hot-node and double policies (tree.py).
    daemon_args = ("--hot-checkpoints", "1", "--double-policy", "always")

    def __init__(self, plan: CRPlan, console, json_out: bool):
        super().__init__(plan, console, json_out)
        self.states: list[dict] = []
        self.failures: list[str] = []
        self.mb = 0
        self.expect: dict[str, int] = {}   # checkpoint id -> the Python counter it holds
        self.counter = 0
        self.copy_info: dict = {}
        self.memory: list[dict] = []

    # -- set-up ---------------------------------------------------------------------------

    def preflight(self) -> None:
        from deltabox.host.criu import find_criu
        self.demo_tar = CACHE / "images" / "demo.tar"
        if not self.demo_tar.exists():
            raise SystemExit(f"{self.demo_tar} is missing: run `make setup` "
                             "(native/setup-host.sh builds the demo image)")
        self.criu_bin = find_criu()
        if self.criu_bin is None:
            raise SystemExit("deltabox bench cr needs CRIU (native/setup-host.sh)")

    def body(self, client, work: Path) -> None:
        if not self.status.criu_version:
            raise SystemExit("the daemon found no CRIU: full checkpoints are unavailable")
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        img = client.import_image("demo", self.demo_tar)
        self.image = {"name": "demo", "mib": round(img.size_bytes / 2**20),
                      "import_s": round(time.perf_counter() - t0, 1)}
        self.log(f"imported the demo image ({self.image['mib']} MiB) in "
                 f"{self.image['import_s']} s")
        for mb in self.plan.rss_mb:
            self.run_state(client, mb, work)
        if self.plan.memory_mb:
            self.mb = self.plan.memory_mb
            for mode in ("off", "on"):
                self.log(f"[bold]memory per double[/], {self.mb} MB, ksm {mode} (a daemon "
                         "of its own)")
                self.memory += self.guarded(f"memory per double (ksm {mode})",
                                            memory_per_double, mode, self.mb, self.log) or []

    # -- the daemon's background work -----------------------------------------------------

    def settle(self, doubles: int = 0) -> set[str]:
        """Wait until the daemon is idle: no criu child, branch mounts and frozen sandbox
        cgroups steady and at least `doubles` of them, its CPU time flat for 100 ms.
        Returns the frozen cgroups (the body doubles)."""
        v = self.view
        deadline = time.monotonic() + 15 + self.mb * 0.03
        last, quiet, cpu0, frozen = None, 0, v.cpu_ticks(), set()
        while time.monotonic() < deadline:
            time.sleep(0.025)
            criu, frozen = v.criu_running(), v.frozen_cgroups()
            cpu = v.cpu_ticks()
            key = (v.branch_mounts(), frozenset(frozen))
            if criu == 0 and key == last and len(frozen) >= doubles and cpu - cpu0 <= 0.01:
                quiet += 1
            else:
                quiet, cpu0 = 0, cpu
            last = key
            if quiet >= 4:
                break
        else:
            self.unsettled += 1
        time.sleep(self.plan.pause_s)
        return frozen

    def _wait_new_double(self, before: set[str], t_ref: float) -> float | None:
        """ms from t_ref until a frozen cgroup not in `before` appears (the new double)."""
        deadline = time.monotonic() + 15 + self.mb * 0.03
        while time.monotonic() < deadline:
            if self.view.frozen_cgroups() - before:
                return 1000 * (time.perf_counter() - t_ref)
            time.sleep(0.005)
        return None

    # -- one state ------------------------------------------------------------------------

    def step(self, sh, py) -> None:
        """An agent step: the shell appends to a file, Python bumps its counter."""
        r = sh.run('STEP=$((STEP+1)); echo "step $STEP" >> /root/notes.txt')
        if r.exit_code != 0:
            raise RuntimeError(f"bash step failed: {r.stderr[-300:]!r}")
        r = py.run("counter += 1")
        if r.exit_code != 0:
            raise RuntimeError(f"python step failed: {r.stderr[-300:]!r}")
        self.counter += 1

    def checkpoint(self, sbx, label: str):
        info = sbx.checkpoint(label, full=True)
        self.expect[info.id] = self.counter
        return info

    def verify(self, py, ckpt, what: str) -> None:
        """The Python session holds the checkpoint's counter (untimed)."""
        got = py.run("print(counter, len(blob))").stdout.decode().split()
        want = [str(self.expect[ckpt.id]), str(self.mb << 20)]
        if got != want:
            self.failures.append(f"{self.mb} MB, after {what}: Python session has counter/blob "
                                 f"{got}, the checkpoint had {want}")
        self.counter = self.expect[ckpt.id]

    def guarded(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - report it, measure the rest
            msg = f"{self.mb} MB: {what} failed: {type(e).__name__}: {str(e)[:500]}"
            self.failures.append(msg)
            self.log(f"[red]{msg}[/]")
            return None

    def run_state(self, client, mb: int, work: Path) -> None:
        self.mb = mb
        limit = (mb + 512) << 20
        self.log(f"[bold]{mb} MB state[/]: sandbox from the demo image, memory limit "
                 f"{limit >> 20} MiB")
        t0 = time.perf_counter()
        sbx = client.create("demo", name=f"cr-{mb}", memory=limit)
        root = None
        try:
            sh = sbx.open_session("bash", name="shell")
            py = sbx.open_session("python", name="py")
            sh.run("cd /root && STEP=0 && export AGENT=bench")
            r = py.run(f"import os\nblob = os.urandom({mb} << 20)\ncounter = 0\n"
                       "print(next(int(l.split()[1]) for l in open('/proc/self/status') "
                       "if l.startswith('VmRSS')) >> 10)")
            if r.exit_code != 0:
                raise RuntimeError(f"python set-up failed: {r.stderr[-500:]!r}")
            self.counter = 0
            state = {"rss_mb": mb, "memory_limit_mb": limit >> 20,
                     "python_vmrss_mb": int(r.stdout.split()[-1]),
                     "setup_s": round(time.perf_counter() - t0, 1)}
            self.states.append(state)
            if len(self.states) == 1:
                self.settle()
                self.measure_floor(client, sbx, op="GetSandbox (gRPC floor, back to back)",
                                   rss_mb=mb, n=None)
                self.measure_floor(client, sbx, pause=self.plan.pause_s,
                                   op=f"GetSandbox (gRPC floor, after "
                                      f"{1000 * self.plan.pause_s:.0f} ms idle)",
                                   rss_mb=mb, n=None)
            self.measure_exec_idle(sbx)
            root = self.checkpoint(sbx, "c0")
            chain = self.guarded("checkpoints", self.measure_checkpoint, client, sbx, sh, py)
            if not chain:
                return
            older, head = chain
            self.guarded("rollbacks via the double", self.measure_rollback_double, client, sbx,
                         sh, py, head)
            self.guarded("rollbacks via restore", self.measure_rollback_restore,
                         client, sbx, sh, py, head, older)
            self.guarded("rollbacks right after a checkpoint", self.measure_rollback_early,
                         client, sbx, sh, py)
            if mb in self.plan.fork_rss_mb:
                self.guarded("forks", self.measure_fork, client, head)
            self.guarded("baseline", self.baseline, client, sbx, work)
            self.settle(doubles=1)
            full = [c for c in sbx.checkpoints() if c.image_bytes]
            state["checkpoints"] = len(full)
            state["image_mb_p50"] = round(percentile([c.image_bytes / 2**20 for c in full],
                                                     50), 1)
            shared = [c.image_shared_bytes / 2**20 for c in full if c.id != root.id]
            state["image_shared_mb_p50"] = round(percentile(shared, 50), 1) if shared else None
        finally:
            self.settle(doubles=1)  # a destroy racing the double's build leaks it
            sbx.destroy()
            self.settle()
            left = self.view.branch_mounts()
            kids = self.view.children_summary()
            if left or kids:
                self.leaks.append({"rss_mb": mb, "branch_mounts_left": left,
                                   "daemon_children_left": kids})
                self.log(f"  [red]left after destroying the only sandbox: {left} branch "
                         f"mount(s), daemon children {kids}[/]")
            if root is not None:
                client.delete_checkpoint(root.id, cascade=True)  # frees the store

    # -- measurements ---------------------------------------------------------------------

    def measure_exec_idle(self, sbx) -> None:
        self.settle()
        cell = Cell()
        for _ in range(self.plan.n("exec", self.mb)):
            t0 = time.perf_counter()
            sbx.exec(["true"]).check()
            cell.add(1000 * (time.perf_counter() - t0), None, {})
        self.record(**cell.row(op="exec true (idle)", rss_mb=self.mb, n=None))

    def _exec_during(self, sbx, box: dict) -> None:
        """In a second thread: poll the sandbox's freezer; the moment it starts freezing
        (the checkpoint's gate is closed by then), run `exec true` and time it."""
        name = self.view.cgroup_of(box["init_pid"])
        if name is None:
            return
        deadline = time.monotonic() + 60
        while not box.get("done") and time.monotonic() < deadline:
            if self.view.freezer_state(name) != "THAWED":
                t0 = time.perf_counter()
                sbx.exec(["true"]).check()
                box["exec_at"], box["exec_end"] = t0, time.perf_counter()
                return
            time.sleep(0.0002)

    def measure_checkpoint(self, client, sbx, sh, py):
        import threading
        n = self.plan.n("checkpoint", self.mb)
        self.log(f"  {n} full checkpoints")
        cell, after, during, ready, images = Cell(), Cell(), Cell(), [], []
        prev = head = None
        for i in range(n):
            self.step(sh, py)
            before = self.settle(doubles=1)
            box: dict = {}
            if i % 2 == 0:
                box["init_pid"] = client.get(sbx.id).info.init_pid
                th = threading.Thread(target=self._exec_during, args=(sbx, box), daemon=True)
                th.start()

            def ck():
                box["t0"] = time.perf_counter()
                try:
                    return self.checkpoint(sbx, f"c{i + 1}")
                finally:
                    box["t1"] = time.perf_counter()
                    box["done"] = True

            def exec_after():
                if i % 2 == 1:
                    t0 = time.perf_counter()
                    sbx.exec(["true"]).check()
                    after.add(1000 * (time.perf_counter() - t0), None, {})
            info, wall, handler = self.timed(client, "Checkpoint", ck, then=exec_after)
            if i % 2 == 0:
                th.join(60)
                if "exec_at" in box:
                    during.add(1000 * (box["exec_end"] - box["exec_at"]), None, {
                        "issued_after_ms": 1000 * (box["exec_at"] - box["t0"]),
                        "waited_for_checkpoint_ms": max(0.0, 1000 * (box["t1"] - box["exec_at"])),
                        "after_checkpoint_ms": 1000 * (box["exec_end"] - box["t1"])})
            cell.add(wall, handler, info.timings_ms)
            images.append(info.image_bytes / 2**20)
            d = self._wait_new_double(before, box["t1"])
            if d is not None:
                ready.append(d)
            prev, head = head, info
        row = self.record(**cell.row(op="checkpoint (full)", rss_mb=self.mb, n=None))
        row["image_mb"] = summary(images)
        row["double_ready_ms"] = summary(ready) if ready else None
        if after.grpc:
            self.record(**after.row(op="exec right after checkpoint returns", rss_mb=self.mb,
                                    n=None))
        if during.grpc:
            self.record(**during.row(op="exec issued during checkpoint (at freeze)",
                                     rss_mb=self.mb, n=None))
        return prev, head

    def measure_rollback_double(self, client, sbx, sh, py, head) -> None:
        n = self.plan.n("double", self.mb)
        self.log(f"  {n} rollbacks via the body double")
        cell = Cell()
        for _ in range(n):
            self.step(sh, py)
            self.settle(doubles=1)
            res, wall, handler = self.timed(client, "Rollback", lambda: sbx.rollback(head.id))
            cell.add(wall, handler, res.timings_ms, res.path)
            self.counter = self.expect[head.id]
        self.record(**cell.row(op="rollback (double)", rss_mb=self.mb, n=None))
        self.verify(py, head, "rollbacks via the double")

    def measure_rollback_restore(self, client, sbx, sh, py, head, older) -> None:
        n = self.plan.n("restore", self.mb)
        self.log(f"  {n} rollbacks via CRIU restore")
        cell, target = Cell(), head
        for i in range(n):
            target = older if i % 2 == 0 else head
            self.step(sh, py)
            self.settle(doubles=1)
            res, wall, handler = self.timed(client, "Rollback", lambda: sbx.rollback(target.id))
            cell.add(wall, handler, res.timings_ms, res.path)
            self.counter = self.expect[target.id]
        self.record(**cell.row(op="rollback (restore)", rss_mb=self.mb, n=None))
        self.verify(py, target, "rollbacks via restore")
        if target is not head:
            self.settle(doubles=1)
            sbx.rollback(head.id)
            self.counter = self.expect[head.id]

    def measure_rollback_early(self, client, sbx, sh, py) -> None:
        """A checkpoint, a step, and at once back to that checkpoint -- an action that
        failed fast, before the daemon finished the checkpoint's double (it then waits
        for that double rather than restoring)."""
        n = self.plan.n("restore", self.mb)
        self.log(f"  {n} rollbacks right after a checkpoint")
        cell = Cell()
        for i in range(n):
            self.step(sh, py)
            self.settle(doubles=1)
            ck = self.checkpoint(sbx, f"early{i}")
            self.step(sh, py)
            res, wall, handler = self.timed(client, "Rollback", lambda: sbx.rollback(ck.id))
            cell.add(wall, handler, res.timings_ms, res.path)
            self.counter = self.expect[ck.id]
        self.record(**cell.row(op="rollback right after checkpoint", rss_mb=self.mb, n=None))
        self.verify(py, ck, "rollbacks right after a checkpoint")

    def _destroy_all(self, children) -> int:
        live = [c.sandbox for c in children if c.sandbox is not None]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: s.destroy(), live))
        return len(children) - len(live)

    def measure_fork(self, client, head) -> None:
        ncpu = os.cpu_count() or 1
        for k in self.plan.forks:
            n = self.plan.n("fork", self.mb, k)
            self.log(f"  fork {k}: {n} cold, {n} pre-warmed")
            cold, own_core_ms, use = Cell(), [], []
            for _ in range(n):
                self.settle(doubles=1)
                # CPU of the daemon + CRIU + every sandbox process (its own cgroup): the
                # machine's other work is not in it.
                c0 = self.daemon.cpu_seconds()
                children, wall, handler = self.timed(client, "Fork", lambda: client.fork(head, k))
                own = 1000 * (self.daemon.cpu_seconds() - c0)
                cold.add(wall, handler, children.timings_ms)
                cold.failed += self._destroy_all(children)
                own_core_ms.append(own)
                use.append(100 * own / max(1e-6, wall * ncpu))
            row = self.record(**cold.row(op=f"fork {k} (cold)", rss_mb=self.mb, n=k))
            row["fork_core_ms"] = summary(own_core_ms, 1)
            row["fork_cpu_use_pct"] = summary(use, 1)  # own CPU / (wall x cores)

            warm, with_warm, prep, ready, pool_mib = Cell(), Cell(), [], [], []
            for _ in range(n):
                self.settle(doubles=1)
                res, w = timed_ms(lambda: client.warm(head, k, wait=True))
                ready.append(res)
                prep.append(w)
                frozen = self.settle(doubles=1 + min(k, ready[-1]))  # the budget may cap it
                # the pool's memory: every double's cgroup, less the sandbox's own double
                mem = sum(self.view.cgroups.memory_usage(c) for c in frozen)
                pool_mib.append(mem / 2**20 * max(0, len(frozen) - 1) / max(1, len(frozen)))
                children, wall, handler = self.timed(client, "Fork", lambda: client.fork(head, k))
                warm.add(wall, handler, children.timings_ms)
                with_warm.add(w + wall, None, {})
                warm.failed += self._destroy_all(children)
            row = self.record(**warm.row(op=f"fork {k} (pre-warmed)", rss_mb=self.mb, n=k))
            row["warm_ms"] = summary(prep)
            row["warm_ready_min"] = min(ready)
            row["pool_mib"] = round(percentile(pool_mib, 50))
            self.record(**with_warm.row(op=f"fork {k} (pre-warmed) incl. Warm", rss_mb=self.mb,
                                        n=k))

    def baseline(self, client, sbx, work: Path) -> None:
        n = self.plan.n("baseline", self.mb)
        self.log(f"  baseline: {n} x (criu dump + cp changed files, criu restore + cp back, "
                 "copytree of the root)")
        base = PlainCriuBaseline(self.criu_bin, work, self.mb, self.log)
        for i in range(n):
            self.settle(doubles=1)
            base.once(client.get(sbx.id).info.init_pid, i)
        self.baselines += base.rows()

    # -- document -------------------------------------------------------------------------

    def document(self) -> dict:
        return {
            "config": {"quick": self.plan.quick, "iterations": self.plan.iterations,
                       "rss_mb": list(self.plan.rss_mb),
                       "fork_rss_mb": list(self.plan.fork_rss_mb),
                       "forks": list(self.plan.forks),
                       "criu": getattr(self, "status", None) and self.status.criu_version,
                       "image": getattr(self, "image", None)},
            "states": self.states,
            "results": self.results,
            "baselines": self.baselines,
            "memory": self.memory,
            "leaks": self.leaks,
        }

    def analyse(self, doc: dict) -> None:
        notes = doc.pop("notes")
        doc["ratios"] = cr_ratios(doc)
        doc["targets"] = cr_targets(doc)
        from deltabox.config import Config
        budget = Config().warm_budget_bytes
        for f in self.failures:
            notes.append(f"FAILED: {f}")
        if self.unsettled:
            notes.append(f"{self.unsettled} timed operations started before the daemon's "
                         "background work had settled (timeout)")
        for lk in self.leaks:
            kids = ", ".join(f"{v} x {k}" for k, v in lk["daemon_children_left"].items())
            notes.append(f"daemon bug: after the {lk['rss_mb']} MB run destroyed its only "
                         f"sandbox, {lk['branch_mounts_left']} branch mount(s) and these daemon "
                         f"children were left (cumulative since the daemon started): "
                         f"{kids or 'none'}")
        notes += cr_result_notes(doc, budget)
        notes.append("baselines: plain `criu dump` / `criu restore` (CLI) of the sandbox's "
                     "process tree + `cp -a --reflink=auto` of the files the step changed "
                     "(primary); the same with a copytree of the whole root (2nd, labelled); "
                     "same sample count as the rollbacks via the double")
        doc["notes"] = notes


def main_cr(args) -> int:
    def render(doc, console) -> None:
        render_cr(doc, console)
        render_memory(doc, console)
    return run_main(args, make_cr_plan(args.quick, args.iterations), CRBench, render)
