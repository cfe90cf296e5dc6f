"""`deltabox bench tree`: DeltaCR the way tree search and RL use it, against plain CRIU.

On demo-image sandboxes whose Python session holds `--mb` MB (os.urandom) and a bash
session, through the Python client:

* "tree search": each of S sandboxes (S in `--sandboxes`, run side by side, one client
  thread each) starts from a full checkpoint, then repeats: roll back to a random one
  of its last 8 checkpoints, wait the model's think time (`--think-ms`), run a step (the
  Python session checks that it holds the checkpoint's counter and bumps it; the shell
  appends to /root/notes.txt), checkpoint (full). Timed client-side: the rollback (with
  the path the daemon reports: the path mix), the first exec after it ("exec true
  after rollback", beside "exec true (idle)"), the checkpoint.
* "back-to-back": the same checkpoint twice, `gap` ms apart (0 and 50), once the
  daemon is idle; the second rollback is timed (the first one used a double).
* "right after checkpoint": a checkpoint, and at once a rollback to it (its double is
  still being built).
* baseline (`cr_baseline.py`, same run, same sandbox): plain `criu restore` + `cp` of
  the changed files ("rollback: criu restore + cp changed files").

The daemon's policy (how many checkpoints per sandbox keep a double) is set with
`--hot-checkpoints` / `--hottest-pool`, passed to the throw-away daemon.

`--busy N` is a mode of its own (issue 10, target 1: rollback to any hot node p50 <= 2 ms,
p99 <= 10 ms with 32 busy sandboxes): one measured agent (demo image, `--mb` MB) makes
8 hot checkpoints (full, each with its double ready), then rolls back to a random one of
them `--iterations` times (default 300), a GetSandbox (the gRPC floor) between two
rollbacks, `--think-ms` apart on average (its double is rebuilt meanwhile) -- first with N tiny sandboxes present but idle (the baseline),
then while each of them runs a CPU/IO-active loop and a client thread drives it like an
RL trainer (exec, checkpoint full and fs in turn, every 4th step a rollback to one of
its last 4; `--busy-gap-ms` between two calls, 50 by default: more than 2 cores can serve). The load runs in a separate client process (`_busy_load`), so that its
threads do not take the measuring client's GIL. Reported: rollback and floor p50 / p95
/ p99 per phase, the path mix (and the rollbacks that found their double ready, the
hot path, on their own), and what the load did (its calls, their p50/p95).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltabox.bench.common import CACHE, Cell, DaemonBench, run_main, timed_ms
from deltabox.bench.cr_baseline import ROLLBACK_PLAIN, PlainCriuBaseline
from deltabox.bench.report import fmt, target
from deltabox.stats import percentile, summary

__all__ = ["TreePlan", "TreeBench", "main_tree"]

WINDOW = 8  # roll back to a random one of the last WINDOW checkpoints
HOT = "rollback to a hot node"
HOT_FAST = "rollback to a hot node: its double was ready"
FLOOR = "GetSandbox (gRPC floor)"
# The busy sandboxes' own process: CPU (a shell count) and IO (64 KiB files), until
# /tmp/stop appears (created when the load ends).
BUSY_LOOP = ("mkdir -p /tmp; while [ ! -f /tmp/stop ]; do i=0; while [ $i -lt 2000 ]; do "
             "i=$((i+1)); done; head -c 65536 /dev/urandom > /tmp/busy.$((i % 4)); "
             "sleep 0.05; done")


@dataclass
class TreePlan:
    sandboxes: tuple[int, ...] = (1, 4)
    steps: int = 40          # per sandbox
    mb: int = 10
    think_ms: int = 300      # between the rollback and the step: the model proposing one
    gaps_ms: tuple[int, ...] = (0, 50)
    pairs: int = 10
    baseline: int = 10
    hot_checkpoints: int | None = None
    hottest_pool: int | None = None
    quick: bool = False
    iterations: int = 0
    pause_s: float = 0.1
    busy: int = 0            # > 0: the busy mode (see the module's docstring)
    busy_gap_ms: int = 50    # the busy load's mean pause between two calls of a sandbox
    notes: list[str] = field(default_factory=list)


class TreeBench(DaemonBench):
    benchmark = "deltabox bench tree"

    def __init__(self, plan: TreePlan, console, json_out: bool):
        super().__init__(plan, console, json_out)
        args = []
        if plan.hot_checkpoints is not None:
            args += ["--hot-checkpoints", str(plan.hot_checkpoints)]
        if plan.hottest_pool is not None:
            args += ["--hottest-pool", str(plan.hottest_pool)]
        self.daemon_args = tuple(args)
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def preflight(self) -> None:
        from deltabox.host.criu import find_criu
        self.demo_tar = CACHE / "images" / "demo.tar"
        if not self.demo_tar.exists():
            raise SystemExit(f"{self.demo_tar} is missing: run `make setup`")
        self.criu_bin = find_criu()
        if self.criu_bin is None:
            raise SystemExit("deltabox bench tree needs CRIU (native/setup-host.sh)")

    # -- helpers --------------------------------------------------------------------------

    def settle(self) -> None:
        """Until no criu runs and the daemon's CPU is flat for 100 ms (its doubles built)."""
        if not self.view.wait_idle(30):
            self.unsettled += 1
        time.sleep(self.plan.pause_s)

    def agent(self, client, name: str):
        sbx = client.create("demo", name=name, memory=(self.plan.mb + 512) << 20)
        sh = sbx.open_session("bash", name="shell")
        py = sbx.open_session("python", name="py")
        sh.run("cd /root && STEP=0")
        py.run(f"import os\nblob = os.urandom({self.plan.mb} << 20)\ncounter = 0")
        return sbx, sh, py

    def step(self, sh, py, expect: int) -> int:
        """The agent's step: checks the Python counter the checkpoint held, bumps it."""
        got = py.run(f"print(counter)\ncounter = {expect + 1}").stdout.decode().strip()
        if got != str(expect):
            with self._lock:
                self.failures.append(f"after a rollback the counter was {got}, the "
                                     f"checkpoint held {expect}")
        sh.run('STEP=$((STEP+1)); echo "step $STEP" >> /root/notes.txt')
        return expect + 1

    # -- the measurements ---------------------------------------------------------------

    def body(self, client, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        client.import_image("demo", self.demo_tar)
        if self.plan.busy:
            return self.busy(client)
        sbx, sh, py = self.agent(client, "solo")
        try:
            self.settle()
            idle = Cell()
            for _ in range(20):
                time.sleep(self.plan.pause_s)
                _, wall = timed_ms(lambda: sbx.exec(["true"]))
                idle.add(wall, None, {})
            self.record(**idle.row(op="exec true (idle)", sandboxes=1))
            counter = self.back_to_back(sbx, sh, py)
            self.right_after(sbx, sh, py, counter)
            self.baseline(client, sbx, work)
        finally:
            self.settle()
            sbx.destroy()
        for n in self.plan.sandboxes:
            self.tree(client, n)

    # -- the busy mode (--busy N) ---------------------------------------------------------

    def busy(self, client) -> None:
        """Rollbacks to hot nodes with N sandboxes present and idle, then with them busy."""
        n = self.plan.busy
        client.import_image("tiny", CACHE / "images" / "tiny.tar")
        sbx, sh, py = self.agent(client, "solo")
        counter, hot = 0, []
        for i in range(WINDOW):
            counter = self.step(sh, py, counter)
            hot.append((sbx.checkpoint(f"hot-{i}", full=True, wait_ready=True,
                                       rollback_likely=True), counter))
        self.log(f"{len(hot)} hot checkpoints; creating {n} busy sandboxes")
        busy = [client.create("tiny", name=f"busy-{i}", memory=128 << 20) for i in range(n)]
        try:
            self.settle()
            self._hot_rollbacks(client, sbx, py, hot, "idle", n)
            self.log(f"{n} sandboxes busy")
            ctx = multiprocessing.get_context("spawn")
            stop, out = ctx.Event(), ctx.Queue()
            load = ctx.Process(target=_busy_load, args=(
                str(self.daemon.socket), [b.id for b in busy], self.plan.busy_gap_ms / 1000,
                stop, out), daemon=True)
            load.start()
            try:
                time.sleep(3)  # every sandbox's loop running, checkpoints and doubles going
                self._hot_rollbacks(client, sbx, py, hot, "busy", n)
            finally:
                stop.set()
                done = out.get(timeout=300)
                load.join(timeout=30)
            self.record(op="busy load: calls of the N client threads", sandboxes=n,
                        iterations=sum(len(v) for v in done["ms"].values()),
                        grpc_ms=None, calls={k: summary(v) for k, v in done["ms"].items()},
                        errors=done["errors"][:10], n_errors=len(done["errors"]))
            if done["errors"]:
                self.plan.notes.append(f"busy load: {len(done['errors'])} call(s) failed, "
                                       f"first: {done['errors'][0]}")
        finally:
            self.settle()
            for b in busy:
                b.destroy()
            sbx.destroy()

    def _hot_rollbacks(self, client, sbx, py, hot: list, phase: str, n: int) -> None:
        """`--iterations` rollbacks to a random hot checkpoint, each followed by a
        GetSandbox; every 10th checks the Python counter (the state came back)."""
        rng, gap = random.Random(phase), self.plan.think_ms / 2000
        roll, fast, floor = Cell(), Cell(), Cell()
        t0, c0 = time.monotonic(), self.view.cpu_ticks()
        for i in range(self.plan.iterations or 300):
            ckpt, counter = rng.choice(hot)
            time.sleep(rng.uniform(0.5, 1.5) * gap)
            r, wall = timed_ms(lambda: sbx.rollback(ckpt))
            roll.add(wall, None, r.timings_ms, r.path)
            if r.path in ("double", "standby"):
                fast.add(wall, None, r.timings_ms, r.path)
            time.sleep(rng.uniform(0.5, 1.5) * gap)
            _, wall = timed_ms(lambda: client.get(sbx.id))
            floor.add(wall, None, {})
            if i % 10 == 9:
                got = py.run("print(counter)").stdout.decode().strip()
                if got != str(counter):
                    self.failures.append(f"{phase}: after a rollback the counter was {got}, "
                                         f"the checkpoint held {counter}")
        cpu = round(100 * (self.view.cpu_ticks() - c0) / (time.monotonic() - t0), 1)
        load = round(os.getloadavg()[0], 2)
        for op, cell in ((HOT, roll), (HOT_FAST, fast), (FLOOR, floor)):
            if not cell.grpc:
                continue
            row = cell.row(op=op, phase=phase, sandboxes=n, loadavg=load,
                           daemon_cpu_pct=cpu)
            row["grpc_ms"]["p99"] = round(percentile(cell.grpc, 99), 3)
            if cell.daemon:
                row["daemon_ms"]["p99"] = round(percentile(cell.daemon, 99), 3)
            self.record(**row)

    def tree(self, client, n: int) -> None:
        self.log(f"tree search: {n} sandbox(es) x {self.plan.steps} steps, think "
                 f"{self.plan.think_ms} ms")
        agents = [self.agent(client, f"tree-{n}-{i}") for i in range(n)]
        cells = {k: Cell() for k in ("rollback", "exec", "checkpoint")}
        try:
            self.settle()
            threads = [threading.Thread(target=self._walk, args=(a, cells, i))
                       for i, a in enumerate(agents)]
            load0 = os.getloadavg()[0]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            load = round((load0 + os.getloadavg()[0]) / 2, 2)
            for k, op in (("rollback", "rollback to one of the last 8 (tree search)"),
                          ("exec", "exec true after rollback (tree search)"),
                          ("checkpoint", "checkpoint full (tree search)")):
                self.record(**cells[k].row(op=op, sandboxes=n, loadavg=load))
        finally:
            self.settle()
            for sbx, _, _ in agents:
                sbx.destroy()
            self.settle()

    def _walk(self, agent, cells: dict, seed: int) -> None:
        sbx, sh, py = agent
        rng = random.Random(seed)
        counter = 0
        history = [(sbx.checkpoint("root", full=True), counter)]
        try:
            for _ in range(self.plan.steps):
                ckpt, counter = rng.choice(history[-WINDOW:])
                r, wall = timed_ms(lambda: sbx.rollback(ckpt))
                _, exec_ms = timed_ms(lambda: sbx.exec(["true"]))
                with self._lock:
                    cells["rollback"].add(wall, None, r.timings_ms, r.path)
                    cells["exec"].add(exec_ms, None, {})
                time.sleep(self.plan.think_ms / 1000)
                counter = self.step(sh, py, counter)
                info, ck_ms = timed_ms(lambda: sbx.checkpoint("step", full=True))
                with self._lock:
                    cells["checkpoint"].add(ck_ms, None, {})
                history.append((info, counter))
        except Exception as e:  # noqa: BLE001 - report it, keep the other walkers' samples
            with self._lock:
                self.failures.append(f"tree walker {seed}: {type(e).__name__}: {e}"[:400])

    def back_to_back(self, sbx, sh, py) -> int:
        """Returns the Python counter afterwards."""
        counter = self.step(sh, py, 0)
        ckpt = sbx.checkpoint("b2b", full=True, wait_ready=True)
        for gap in self.plan.gaps_ms:
            first, second = Cell(), Cell()
            for _ in range(self.plan.pairs):
                self.settle()
                r1, w1 = timed_ms(lambda: sbx.rollback(ckpt))
                time.sleep(gap / 1000)
                r2, w2 = timed_ms(lambda: sbx.rollback(ckpt))
                first.add(w1, None, r1.timings_ms, r1.path)
                second.add(w2, None, r2.timings_ms, r2.path)
            self.record(**second.row(op=f"rollback back-to-back, 2nd of 2, gap {gap} ms",
                                     sandboxes=1, loadavg=round(os.getloadavg()[0], 2),
                                     first_paths=first.paths))
        return self.step(sh, py, counter)

    def right_after(self, sbx, sh, py, counter: int) -> None:
        cell = Cell()
        for _ in range(self.plan.pairs):
            self.settle()
            counter = self.step(sh, py, counter)
            ckpt = sbx.checkpoint("now", full=True)
            r, wall = timed_ms(lambda: sbx.rollback(ckpt))
            cell.add(wall, None, r.timings_ms, r.path)
        self.record(**cell.row(op="rollback right after checkpoint", sandboxes=1,
                               loadavg=round(os.getloadavg()[0], 2)))

    def baseline(self, client, sbx, work: Path) -> None:
        base = PlainCriuBaseline(self.criu_bin, work, self.plan.mb, self.log)
        for i in range(self.plan.baseline):
            self.settle()
            base.once(client.get(sbx.id).info.init_pid, i)
        self.baselines += [r for r in base.rows() if r["op"] == ROLLBACK_PLAIN]

    # -- document -------------------------------------------------------------------------

    def document(self) -> dict:
        p = self.plan
        return {"config": {"sandboxes": list(p.sandboxes), "steps": p.steps, "mb": p.mb,
                           "think_ms": p.think_ms, "gaps_ms": list(p.gaps_ms),
                           "pairs": p.pairs, "busy": p.busy, "busy_gap_ms": p.busy_gap_ms,
                           "iterations": p.iterations,
                           "daemon_args": list(self.daemon_args)},
                "results": self.results, "baselines": self.baselines,
                "failures": self.failures}

    def analyse(self, doc: dict) -> None:
        rows = {(r["op"], r.get("sandboxes")): r for r in doc["results"]}
        base = next((b["ms"]["p50"] for b in doc["baselines"]), None)
        targets = []
        for n in self.plan.sandboxes:
            r = rows.get(("rollback to one of the last 8 (tree search)", n))
            if r:
                v = r["grpc_ms"]["p50"]
                targets.append(target(f"tree search rollback, {n} sandbox(es)", "<= 2 ms",
                                      v, f"paths {r.get('paths')}", v <= 2))
        for gap in self.plan.gaps_ms:
            r = rows.get((f"rollback back-to-back, 2nd of 2, gap {gap} ms", 1))
            if r:
                v = r["grpc_ms"]["p50"]
                targets.append(target(f"back-to-back rollback, gap {gap} ms", "<= 2 ms", v,
                                      f"paths {r.get('paths')}", v <= 2))
        r = rows.get(("rollback right after checkpoint", 1))
        if r and base is not None:
            v = r["grpc_ms"]["p50"]
            targets.append(target("rollback right after checkpoint", f"<= plain CRIU "
                                  f"({base:.0f} ms)", v, f"paths {r.get('paths')}", v <= base))
        idle = rows.get(("exec true (idle)", 1))
        for n in self.plan.sandboxes:
            r = rows.get(("exec true after rollback (tree search)", n))
            if r and idle:
                v, lim = r["grpc_ms"]["p50"], idle["grpc_ms"]["p50"]
                targets.append(target(f"first exec after rollback, {n} sandbox(es)",
                                      f"~ idle exec ({lim:.2f} ms)", v, "", v <= 1.5 * lim))
        for phase in ("idle", "busy"):
            r = next((x for x in doc["results"] if x["op"] == HOT and x.get("phase") == phase),
                     None)
            fast = next((x for x in doc["results"]
                         if x["op"] == HOT_FAST and x.get("phase") == phase), None)
            if fast:
                g = fast["grpc_ms"]
                targets.append(target(f"hot-node rollback p99, double ready ({phase})",
                                      "<= 10 ms", g["p99"], f"{g['n']} of {r['iterations']}",
                                      g["p99"] <= 10))
            if r:
                g = r["grpc_ms"]
                where = f"{phase}, {r['sandboxes']} other sandboxes; paths {r.get('paths')}"
                targets.append(target(f"hot-node rollback p50 ({phase})", "<= 2 ms", g["p50"],
                                      where, g["p50"] <= 2))
                targets.append(target(f"hot-node rollback p99 ({phase})", "<= 10 ms", g["p99"],
                                      where, g["p99"] <= 10))
        doc["targets"] = targets
        for f in self.failures:
            doc["notes"].append(f"FAILED: {f}")
        if self.unsettled:
            doc["notes"].append(f"{self.unsettled} waits for the daemon's background work "
                                "timed out (30 s): what followed paid for some of it")


def render_tree(doc: dict, console) -> None:
    from rich.table import Table

    from deltabox.bench.report import render_targets_and_notes
    t = Table("operation", "sandboxes", "n", "client p50", "p95", "p99", "daemon p50", "paths",
              "load", title="deltabox bench tree (ms)", box=None, header_style="bold")
    for r in doc["results"] + doc["baselines"]:
        if r.get("calls") is not None:  # the busy load's own calls
            for k, c in r["calls"].items():
                t.add_row(f"busy load: {k}", fmt(r["sandboxes"]), fmt(c["n"]), fmt(c["p50"]),
                          fmt(c["p95"]), "-", "-", f"errors: {r['n_errors']}", "-")
            continue
        ms = r.get("grpc_ms") or r.get("ms")
        op = r["op"] + (f" ({r['phase']})" if r.get("phase") else "")
        t.add_row(op, fmt(r.get("sandboxes", 1)), fmt(r["iterations"]),
                  fmt(ms["p50"]), fmt(ms["p95"]), fmt(ms.get("p99")),
                  fmt((r.get("daemon_ms") or {}).get("p50")),
                  " ".join(f"{k}:{v}" for k, v in (r.get("paths") or {}).items()),
                  fmt(r.get("loadavg")))
    console.print(t)
    render_targets_and_notes(doc, console)


def main_tree(args) -> int:
    plan = TreePlan(quick=args.quick)
    if args.quick:
        plan.sandboxes, plan.steps, plan.pairs, plan.baseline = (1, 2), 12, 5, 5
    if args.iterations:
        plan.steps = plan.pairs = plan.baseline = args.iterations
    if args.sandboxes:
        plan.sandboxes = tuple(int(x) for x in args.sandboxes.split(","))
    plan.think_ms = args.think_ms
    plan.busy, plan.iterations = args.busy, args.iterations or 0
    plan.busy_gap_ms = args.busy_gap_ms
    plan.hot_checkpoints, plan.hottest_pool = args.hot_checkpoints, args.hottest_pool
    return run_main(args, plan, TreeBench, render_tree)


def _busy_load(socket: str, sandbox_ids: list[str], gap_s: float, stop, out) -> None:
    """The busy sandboxes' load, in a process of its own (spawned): in each sandbox a
    CPU/IO-active loop (`BUSY_LOOP`), and a client thread that runs it like an RL
    trainer until `stop` is set: exec, checkpoint (full and fs in turn), every 4th step a
    rollback to one of its last 4 checkpoints, `gap_s` apart on average. Puts {"ms": {call: [ms]},
    "errors": [...]} on `out`."""
    from deltabox.client import Client
    ms: dict[str, list[float]] = {"exec": [], "checkpoint full": [], "checkpoint fs": [],
                                  "rollback": []}
    errors: list[str] = []
    lock = threading.Lock()

    def drive(client, sid: str, seed: int) -> None:
        rng, sbx, recent = random.Random(seed), client.get(sid), []
        try:
            sbx.exec(["sh", "-c", BUSY_LOOP + " >/dev/null 2>&1 &"])
            step = 0
            while not stop.is_set():
                step += 1
                calls = [("exec", lambda: sbx.exec(["sh", "-c", "echo $$ >> /tmp/steps"]))]
                kind = "full" if step % 2 else "fs"
                calls.append((f"checkpoint {kind}", lambda: recent.append(
                    sbx.checkpoint(f"s{step}", full=kind == "full"))))
                if step % 4 == 0 and recent:
                    target_ = rng.choice(recent[-4:])
                    calls.append(("rollback", lambda: sbx.rollback(target_)))
                for name, call in calls:
                    _, t = timed_ms(call)
                    with lock:
                        ms[name].append(t)
                    time.sleep(rng.uniform(0.4, 1.6) * gap_s)
        except Exception as e:  # noqa: BLE001 - report it, the other threads go on
            with lock:
                errors.append(f"{sid}: {type(e).__name__}: {e}"[:300])
        finally:
            try:
                sbx.exec(["touch", "/tmp/stop"])
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"{sid} stop: {type(e).__name__}: {e}"[:300])

    with Client(socket) as client:
        threads = [threading.Thread(target=drive, args=(client, sid, i))
                   for i, sid in enumerate(sandbox_ids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out.put({"ms": ms, "errors": errors})
