"""`deltabox bench rl`: DeltaCR as an RL rollout uses it -- what one step costs in CPU.

N sandboxes (`--sandboxes`, default 1 and 32, run side by side, one client thread each),
demo image, a Python session holding `--mb` MB (os.urandom) and a bash session. A step is
an exec (appends to /root/notes.txt) and a full checkpoint; after `--rollback-rate` of
the steps (20 %) the environment rolls back to a random one of its last `--recent`
checkpoints. Measured through the Python client:

* CPU core-ms per step: the daemon, its CRIU runs and the sandboxes' processes, from the
  throw-away daemon's accounting cgroup (`ThrowawayDaemon.cpu_seconds`), from before the
  first step until the daemon is idle again (its background doubles are paid in full);
* the step's latency (exec + checkpoint [+ rollback]) p50/p95, each call's, the rollback
  path mix, and the first exec after a rollback beside an exec in a step without one;
* for each `--policies` value (the daemon's `double-policy`; `always` is the behaviour
  before the adaptive policy), on its own throw-away daemon, in the same run;
* baseline (same run, same sandbox): plain CRIU (`cr_baseline.PlainCriuBaseline`):
  `criu dump` + cp of the changed files every step, `criu restore` + cp back on the
  rollback share, their CPU from `getrusage(RUSAGE_CHILDREN)` around each CLI call, plus
  the CPU of the step's exec in the daemon (measured alone): "plain CRIU per step".
"""

from __future__ import annotations

import os
import random
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltabox.bench.common import Cell, run_main, timed_ms
from deltabox.bench.cr_baseline import PlainCriuBaseline
from deltabox.bench.report import fmt, target
from deltabox.bench.tree import TreeBench
from deltabox.stats import summary

__all__ = ["RLPlan", "RLBench", "main_rl"]


@dataclass
class RLPlan:
    sandboxes: tuple[int, ...] = (1, 32)
    steps: int = 30              # per sandbox
    mb: int = 10
    image: str = "demo"          # or "tiny" (busybox: a shell and a sleep, no Python)
    rollback_rate: float = 0.2
    recent: int = 4              # roll back to a random one of the last `recent`
    policies: tuple[str, ...] = ("adaptive", "always")
    baseline: int = 6
    quick: bool = False
    iterations: int = 0
    pause_s: float = 0.1
    hot_checkpoints: int | None = None  # (TreeBench's daemon options: the defaults)
    hottest_pool: int | None = None
    notes: list[str] = field(default_factory=list)


class _MeteredBaseline(PlainCriuBaseline):
    """PlainCriuBaseline, with the CPU of each criu and cp run (children's rusage)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.cpu_ms: dict[str, list[float]] = {"dump": [], "restore": [], "cp": []}

    @staticmethod
    def _children_ms() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return 1000 * (r.ru_utime + r.ru_stime)

    def _criu(self, *args: str, log: Path) -> None:
        c0 = self._children_ms()
        super()._criu(*args, log=log)
        self.cpu_ms[args[0]].append(self._children_ms() - c0)

    def _copy_files(self, src_root, dst_root) -> float:  # noqa: D102 - metered
        c0 = self._children_ms()
        ms = PlainCriuBaseline._copy_files(src_root, dst_root)
        self.cpu_ms["cp"].append(self._children_ms() - c0)
        return ms

    def _kill_restored(self, pid: int) -> None:
        """Reaping the restored tree adds its tasks' restore work to the children's."""
        c0 = self._children_ms()
        PlainCriuBaseline._kill_restored(pid)
        if self.cpu_ms["restore"]:
            self.cpu_ms["restore"][-1] += self._children_ms() - c0


class RLBench(TreeBench):
    benchmark = "deltabox bench rl"

    def __init__(self, plan: RLPlan, console, json_out: bool, policy: str,
                 with_baseline: bool):
        super().__init__(plan, console, json_out)
        self.policy = policy
        self.daemon_args = ("--double-policy", policy)
        self.with_baseline = with_baseline

    def preflight(self) -> None:
        from deltabox.bench.common import CACHE
        from deltabox.host.criu import find_criu
        self.demo_tar = CACHE / "images" / f"{self.plan.image}.tar"
        if not self.demo_tar.exists():
            raise SystemExit(f"{self.demo_tar} is missing: run `make setup`")
        self.criu_bin = find_criu()
        if self.criu_bin is None:
            raise SystemExit("deltabox bench rl needs CRIU (native/setup-host.sh)")

    def agent(self, client, name: str):
        if self.plan.image == "demo":
            return super().agent(client, name)
        sbx = client.create(self.plan.image, name=name, memory=256 << 20)
        sh = sbx.open_session("sh", name="shell")
        sh.run("cd /root 2>/dev/null || cd /tmp; sleep 100000 &")
        return sbx, sh, None

    def body(self, client, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        client.import_image(self.plan.image, self.demo_tar)
        if self.with_baseline:
            self.baseline(client, work)
        for n in self.plan.sandboxes:
            self.rollout(client, n)

    def _exec_step(self, sbx):
        return sbx.exec(["sh", "-c", "mkdir -p /root && echo $$ >> /root/notes.txt"])

    def baseline(self, client, work: Path) -> None:
        """Plain CRIU's CPU per step, on one sandbox; the step's exec measured alone."""
        sbx, sh, py = self.agent(client, "baseline")
        try:
            self.settle()
            n = max(10, self.plan.baseline)
            c0 = self.daemon.cpu_seconds()
            idle = Cell()
            for _ in range(n):
                _, wall = timed_ms(lambda: self._exec_step(sbx))
                idle.add(wall, None, {})
            self.settle()
            exec_cpu = 1000 * (self.daemon.cpu_seconds() - c0) / n
            self.record(**idle.row(op="exec step alone", sandboxes=1, policy=self.policy,
                                   core_ms_per_op=round(exec_cpu, 2)))
            base = _MeteredBaseline(self.criu_bin, work, self.plan.mb, self.log)
            for i in range(self.plan.baseline):
                self.settle()
                base.once(client.get(sbx.id).info.init_pid, i)
            cpu = {k: summary(v)["p50"] for k, v in base.cpu_ms.items() if v}
            p = self.plan.rollback_rate
            # cp: one copy at the checkpoint, one back on a rollback (two per iteration)
            per_step = exec_cpu + cpu["dump"] + cpu["cp"] + p * (cpu["restore"] + cpu["cp"])
            self.baselines.append({
                "op": "plain CRIU per step", "iterations": self.plan.baseline,
                "core_ms_per_step": round(per_step, 1), "exec_core_ms": round(exec_cpu, 2),
                "criu_dump_core_ms": round(cpu["dump"], 1),
                "criu_restore_core_ms": round(cpu["restore"], 1),
                "cp_core_ms": round(cpu["cp"], 2), "rollback_rate": p,
                "ms": summary([d + c for d, c in zip(base.dumps, base.copy_changed)])})
        finally:
            self.settle()
            sbx.destroy()

    def rollout(self, client, n: int) -> None:
        self.log(f"double-policy {self.policy}: RL: {n} sandbox(es) x {self.plan.steps} steps, "
                 f"{self.plan.rollback_rate:.0%} roll back")
        agents = [self.agent(client, f"rl-{n}-{i}") for i in range(n)]
        cells = {k: Cell() for k in ("step", "exec", "exec_after", "checkpoint", "rollback")}
        try:
            self.settle()
            threads = [threading.Thread(target=self._episode, args=(a, cells, i))
                       for i, a in enumerate(agents)]
            load0, c0, t0 = os.getloadavg()[0], self.daemon.cpu_seconds(), time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall_s = time.perf_counter() - t0
            self.settle()  # the doubles built in the background are part of the cost
            cpu_ms = 1000 * (self.daemon.cpu_seconds() - c0)
            steps = len(cells["step"].grpc)
            doubles = len(self.view.frozen_cgroups())
            load = round((load0 + os.getloadavg()[0]) / 2, 2)
            keys = dict(sandboxes=n, policy=self.policy, loadavg=load)
            self.record(**cells["step"].row(
                op="RL step", core_ms_per_step=round(cpu_ms / max(1, steps), 1),
                steps_per_s=round(steps / wall_s, 1), doubles_at_end=doubles, **keys))
            for k, op in (("exec", "exec (no rollback before)"),
                          ("exec_after", "exec right after a rollback"),
                          ("checkpoint", "checkpoint full"), ("rollback", "rollback")):
                if cells[k].grpc:
                    self.record(**cells[k].row(op=op, **keys))
        finally:
            self.settle()
            for sbx, _, _ in agents:
                sbx.destroy()
            self.settle()

    def _episode(self, agent, cells: dict, seed: int) -> None:
        sbx, _, _ = agent
        rng = random.Random(seed)
        history: list = []
        after_rollback = False
        due = rng.random()  # exactly `rollback_rate` of the steps roll back, spread evenly
        try:
            for _ in range(self.plan.steps):
                _, exec_ms = timed_ms(lambda: self._exec_step(sbx))
                info, ck_ms = timed_ms(lambda: sbx.checkpoint("step", full=True))
                history.append(info)
                step_ms, r = exec_ms + ck_ms, None
                due += self.plan.rollback_rate
                if due >= 1:
                    due -= 1
                    target_ck = rng.choice(history[-self.plan.recent:])
                    r, rb_ms = timed_ms(lambda: sbx.rollback(target_ck))
                    step_ms += rb_ms
                with self._lock:
                    cells["exec_after" if after_rollback else "exec"].add(exec_ms, None, {})
                    cells["checkpoint"].add(ck_ms, None, {})
                    cells["step"].add(step_ms, None, {}, r.path if r else "none")
                    if r is not None:
                        cells["rollback"].add(rb_ms, None, r.timings_ms, r.path)
                after_rollback = r is not None
        except Exception as e:  # noqa: BLE001 - report it, keep the other episodes' samples
            with self._lock:
                self.failures.append(f"episode {seed}: {type(e).__name__}: {e}"[:400])

    def document(self) -> dict:
        p = self.plan
        return {"config": {"sandboxes": list(p.sandboxes), "steps": p.steps, "mb": p.mb,
                           "image": p.image,
                           "rollback_rate": p.rollback_rate, "recent": p.recent,
                           "policies": list(p.policies)},
                "results": self.results, "baselines": self.baselines,
                "failures": self.failures}

    def analyse(self, doc: dict) -> None:
        doc["targets"] = rl_targets(doc)
        for f in doc.get("failures", []):
            doc["notes"].append(f"FAILED: {f}")


def rl_targets(doc: dict) -> list[dict]:
    """Issue 10 target 3 (CPU per step) and target 6 (the first exec after a rollback)."""
    rows = {(r["op"], r.get("sandboxes"), r.get("policy")): r for r in doc["results"]}
    base = next((b for b in doc["baselines"] if b["op"] == "plain CRIU per step"), None)
    out = []
    for n in doc["config"]["sandboxes"]:
        ad = rows.get(("RL step", n, "adaptive"))
        al = rows.get(("RL step", n, "always"))
        if ad and base:
            v, lim = ad["core_ms_per_step"], base["core_ms_per_step"]
            out.append(target(f"CPU per RL step, {n} sandbox(es), vs plain CRIU",
                              f"<= {lim:.0f} core-ms", v, f"paths {ad.get('paths')}",
                              v <= lim))
        if ad and al:
            v, lim = ad["core_ms_per_step"], 0.5 * al["core_ms_per_step"]
            out.append(target(f"CPU per RL step, {n} sandbox(es), vs double-policy always",
                              f"<= 0.5x ({lim:.0f} core-ms)", v,
                              f"always {al['core_ms_per_step']} core-ms", v <= lim))
        ex = rows.get(("exec right after a rollback", n, "adaptive"))
        idle = rows.get(("exec (no rollback before)", n, "adaptive"))
        if ex and idle:
            v, lim = ex["grpc_ms"]["p50"], idle["grpc_ms"]["p50"]
            out.append(target(f"first exec after a rollback, {n} sandbox(es)",
                              f"<= 1.25x an exec without ({lim:.2f} ms)", v, "", v <= 1.25 * lim))
    return out


def render_rl(doc: dict, console) -> None:
    from rich.table import Table

    from deltabox.bench.report import render_targets_and_notes
    t = Table("policy", "operation", "sandboxes", "n", "client p50", "p95", "core-ms/step",
              "paths", "load", title="deltabox bench rl (ms)", box=None, header_style="bold")
    for r in doc["results"]:
        t.add_row(r.get("policy", ""), r["op"], fmt(r.get("sandboxes", 1)),
                  fmt(r["iterations"]), fmt(r["grpc_ms"]["p50"]), fmt(r["grpc_ms"]["p95"]),
                  fmt(r.get("core_ms_per_step", r.get("core_ms_per_op"))),
                  " ".join(f"{k}:{v}" for k, v in (r.get("paths") or {}).items()),
                  fmt(r.get("loadavg")))
    for b in doc["baselines"]:
        t.add_row("", b["op"], "1", fmt(b["iterations"]), fmt(b["ms"]["p50"]),
                  fmt(b["ms"]["p95"]), fmt(b["core_ms_per_step"]), "", "")
    console.print(t)
    render_targets_and_notes(doc, console)


class _Passes:
    """`run_main`'s bench: one RLBench per policy (each its own throw-away daemon), the
    plain-CRIU baseline in the first, merged into one document."""

    def __init__(self, plan: RLPlan, console, json_out: bool):
        self.plan, self.console, self.json_out = plan, console, json_out

    def run(self) -> dict:
        doc = None
        for i, policy in enumerate(self.plan.policies):
            part = RLBench(self.plan, self.console, self.json_out, policy, i == 0).run()
            if doc is None:
                doc = part
            else:
                doc["results"] += part["results"]
                doc["failures"] += part["failures"]
                doc["elapsed_s"] = round(doc["elapsed_s"] + part["elapsed_s"], 1)
                doc["host"]["loadavg_end"] = part["host"]["loadavg_end"]
        doc["targets"] = rl_targets(doc)
        doc["notes"] = list(dict.fromkeys(doc["notes"] +
                                          [f"FAILED: {f}" for f in doc["failures"]]))
        return doc


def main_rl(args) -> int:
    plan = RLPlan(quick=args.quick)
    if args.quick:
        plan.sandboxes, plan.steps, plan.baseline = (1, 4), 15, 3
    if args.iterations:
        plan.steps = args.iterations
    if args.sandboxes:
        plan.sandboxes = tuple(int(x) for x in args.sandboxes.split(","))
    if args.policies:
        plan.policies = tuple(args.policies.split(","))
    plan.rollback_rate, plan.recent, plan.mb = args.rollback_rate, args.recent, args.mb
    plan.image = args.image
    from deltabox.core.double_policy import POLICIES
    if not plan.policies or set(plan.policies) - set(POLICIES):
        raise SystemExit(f"--policies: a comma-separated list of {', '.join(POLICIES)}")
    if not 0 <= plan.rollback_rate <= 1 or plan.recent < 1 or plan.mb < 0:
        raise SystemExit("--rollback-rate must be in [0, 1], --recent >= 1, --mb >= 0")
    return run_main(args, plan, _Passes, render_rl)
