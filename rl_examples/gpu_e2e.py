"""GPU utilisation end to end: the real daemon, real sandboxes and a real policy, one host.

    sudo python rl_examples/gpu_e2e.py --out RESULT.json [--envs 16,64] [--rounds 6]
         [--repeats 2] [--mode full|fs] [--budget-s 300] [--device cuda|cpu] [--tiny-model]

What one *round* of the RL loop is, for every environment (env) at once:
  generate   the policy writes each env's action, token by token with a KV cache,
             batched over the envs; the prompt is the env's last observation (bytes of
             its last exec's output), so round r+1 really needs round r's exec
  sandbox    per env: exec the action (a small busybox-sh workload that changes /work
             and prints the observation), checkpoint (full: files + processes, or fs),
             and for 20 % of the steps (--p-rollback) roll back to the previous checkpoint
  train      one training step on the round's rollouts
Schedules (SCHEDULES):
  baseline    today's way on the same sandboxes: the exec through the daemon, then plain
              `criu dump --leave-running` + `cp -a --reflink=auto` of /work as the
              checkpoint, and copytree of the root + cp back + plain `criu restore` as the
              rollback (the method of deltabox/bench/cr_baseline.py and
              rl_examples/sandbox_latencies.py: the restored copy is killed afterwards,
              the live sandbox is never touched); all waited for before training
  sequential  DeltaBox checkpoint/rollback, waited for before training
  overlapped  DeltaBox, the round's sandbox work is started and left running across the
              training step and the next generation; the next generation waits only for
              the execs (its prompts), the next round's sandbox work for the rest
Sandbox work runs in a pool of --workers threads (one env's ops in order, envs in
parallel; a round queues every exec before any checkpoint); the policy runs on the main
thread. --policy-cpus N (default 2 on hosts with 8 or more CPUs) gives the policy's
thread N cores of its own and the daemon, its sandboxes and the sandbox threads the rest
(what `taskset` gives a trainer's policy process on a shared node): the policy's
kernel launches are CPU work, and a CRIU dump on the same core delays them.

U = (T_gen + T_train) / wall: each phase is wall-clocked between torch.cuda.synchronize()
calls, the wall clock runs from the first round's generation to the last round's last
wait. Because work running in the background can slow the policy's own phases down
(the GIL, the CPU), the result also gives U_quiet = the policy's time per round measured
with nothing in the background (median over baseline and sequential runs) x rounds / wall.

The policy (rl_examples/gpu_policy.py) is Qwen2.5-7B-shaped -- width, depth, GQA heads,
vocabulary -- with random bf16 weights in plain torch; its training step back-propagates
into the last --train-layers layers, the final norm and the LM head (0 = every layer):
a last-layers update, not a full 7B step. --tiny-model is a two-layer model of the same
structure for the CPU smoke mode (tests/test_gpu_e2e_smoke.py).

Each schedule starts with an untimed warm-up (one generation and one training step); the
schedules run in a random order (--seed) per repeat; the env counts run in the order
given, and a run is not started once --budget-s would be exceeded (the JSON says which
were skipped). The JSON (--out) is rewritten after every run: the exact command, the
host, every run, and medians per (envs, schedule), under "source" (SOURCE). The replay
harness (rl_examples/gpu_harness.py: sandbox latencies measured elsewhere, replayed as
CPU work) is the labelled fallback where the GPU and the sandboxes cannot share a host.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_latencies import PlainCriu, WORKSPACE, kill_tree  # noqa: E402

from deltabox.host.criu import find_criu  # noqa: E402
from deltabox.stats import summary  # noqa: E402

SCHEDULES = {  # name -> (checkpoint/rollback backend, overlapped)
    "baseline": ("baseline", False),
    "sequential": ("deltabox", False),
    "overlapped": ("deltabox", True),
}
SOURCE = "end-to-end: real daemon, real sandboxes, real policy on one host"
CACHE = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))
TINY_TAR = CACHE / "images" / "tiny.tar"


# -- bookkeeping (no torch) -----------------------------------------------------------------

class Timeline:
    """(what, env, t0, t1) intervals on one perf_counter clock, thread-safe."""

    def __init__(self):
        self.events: list[tuple[str, int, float, float]] = []
        self._lock = threading.Lock()

    def record(self, what: str, env: int, t0: float, t1: float) -> None:
        with self._lock:
            self.events.append((what, env, t0, t1))

    def timed(self, what: str, env: int, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.record(what, env, t0, time.perf_counter())

    def durations_ms(self, what: str) -> list[float]:
        return [1000 * (t1 - t0) for w, _, t0, t1 in self.events if w == what]


def utilisation(t_gen: float, t_train: float, wall: float) -> float:
    """U: the share of the wall time the policy's device did its own work."""
    if wall <= 0:
        raise ValueError("wall time must be positive")
    return (t_gen + t_train) / wall


def action_command(round_no: int, tokens: list[int]) -> str:
    """The shell workload an action stands for: append to a log, rewrite a data file
    whose size the tokens pick, print what the agent observes."""
    kib = sum(tokens) % 48 + 16
    digest = sum((i + 1) * t for i, t in enumerate(tokens)) % 1_000_003
    return (f"mkdir -p {WORKSPACE} && echo r{round_no} a{digest} >> {WORKSPACE}/log && "
            f"dd if=/dev/urandom of={WORKSPACE}/data bs=1024 count={kib} 2>/dev/null && "
            f"echo lines $(wc -l < {WORKSPACE}/log) bytes $(wc -c < {WORKSPACE}/data) "
            f"last $(tail -n 1 {WORKSPACE}/log)")


class Env:
    """One sandbox and its checkpoints (DeltaBox's and the baseline's)."""

    def __init__(self, index: int, sandbox):
        self.index, self.sandbox = index, sandbox
        self.observation = b"start"
        self.history: dict[int, bytes] = {}  # round -> the exec's output
        self.checkpoints: list = []           # DeltaBox CheckpointInfo, oldest first
        self.baseline_dirs: list[Path] = []   # plain CRIU images + copied /work, oldest first


class Fleet:
    """N sandboxes of one image and a thread pool that runs their rounds."""

    def __init__(self, client, n: int, *, image: str = "tiny", full: bool = True,
                 workers: int = 16, scratch: Path | None = None,
                 cpus: set[int] | None = None):
        self.client, self.full = client, full
        self.timeline = Timeline()
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, min(workers, n)),
            initializer=None if cpus is None else os.sched_setaffinity, initargs=(0, cpus))
        self.scratch = scratch or Path(client.status().state_dir) / "store" / "tmp"
        self.criu = find_criu()
        self.counts: Counter = Counter()
        self.envs: list[Env] = []
        futures = [self.pool.submit(client.create, image, f"e2e-{n}-{i}") for i in range(n)]
        errors = []
        for i, f in enumerate(futures):  # every create is waited for: none left behind
            try:
                self.envs.append(Env(i, f.result()))
            except BaseException as e:  # noqa: BLE001 - raised below, after the others
                errors.append(e)
        if errors:
            try:
                self.close()
            except RuntimeError as e:
                errors[0].add_note(str(e))
            raise errors[0]

    def start_round(self, round_no: int, actions: list[list[int]], backend: str,
                    rollback: list[bool]) -> "RoundHandle":
        """Start every env's exec -> checkpoint (-> rollback) in the pool; returns at once.

        Every exec is queued before any checkpoint: the next generation needs all the
        observations, so with more envs than workers no exec waits behind another env's
        checkpoint (the order a trainer that overlaps would pick)."""
        if backend == "baseline" and self.criu is None:
            raise RuntimeError("no criu binary found for the baseline (DELTABOX_CRIU_PREFIX)")
        handle = RoundHandle(len(self.envs))
        for env, tokens in zip(self.envs, actions, strict=True):
            handle.done.append(self.pool.submit(self._env_exec, env, round_no, tokens,
                                                handle.observed[env.index]))
        for env, back in zip(self.envs, rollback, strict=True):
            handle.done.append(self.pool.submit(self._env_save, env, round_no, backend, back,
                                                handle.observed[env.index]))
        return handle

    def _env_exec(self, env: Env, round_no: int, tokens: list[int], observed: Future) -> None:
        i = env.index
        try:
            res = self.timeline.timed("exec", i, env.sandbox.exec,
                                      action_command(round_no, tokens))
            if res.exit_code != 0:
                raise RuntimeError(f"env {i}: action failed ({res.exit_code}): {res.stderr!r}")
            env.observation = env.history[round_no] = res.stdout
            observed.set_result(res.stdout)
        except BaseException as e:
            observed.set_exception(e)
            raise

    def _env_save(self, env: Env, round_no: int, backend: str, back: bool,
                  observed: Future) -> None:
        """The env's checkpoint (and rollback), once its exec is done."""
        tl, i = self.timeline, env.index
        observed.result()
        if backend == "deltabox":
            ck = tl.timed("checkpoint", i, env.sandbox.checkpoint, f"r{round_no}", self.full)
            env.checkpoints.append(ck)
            if back:
                target = env.checkpoints[-2] if len(env.checkpoints) > 1 else ck
                res = tl.timed("rollback", i, env.sandbox.rollback, target)
                self.counts[f"rollback path {res.path.name}"] += 1
                env.checkpoints.append(target)
        else:
            tl.timed("checkpoint", i, self._baseline_checkpoint, env, round_no)
            if back:
                tl.timed("rollback", i, self._baseline_rollback, env)
        self.counts[f"{backend} checkpoints"] += 1
        self.counts[f"{backend} rollbacks"] += back

    # The baseline: plain CRIU on the sandbox's live tree + copies of files.
    def _plain(self, env: Env) -> PlainCriu:
        return PlainCriu(self.criu, env.sandbox.info.init_pid)

    def _baseline_checkpoint(self, env: Env, round_no: int) -> None:
        d = self.scratch / f"baseline-e{env.index}-r{round_no}-{time.monotonic_ns()}"
        (d / "img").mkdir(parents=True)
        (d / "snap").mkdir()
        plain = self._plain(env)
        self.counts["baseline dump retries (unix socket of the daemon)"] += \
            plain.dump_retrying(d / "img")
        plain.copy_changed(plain.root, d / "snap")
        env.baseline_dirs.append(d)
        while len(env.baseline_dirs) > 2:  # a user keeps the parent and the newest
            subprocess.run(["rm", "-rf", "--one-file-system", str(env.baseline_dirs.pop(0))],
                           check=False)

    def _baseline_rollback(self, env: Env) -> None:
        """Back to the previous checkpoint: copytree of the root (the user's container
        directory), the checkpoint's /work copied back, plain `criu restore` onto it."""
        d = env.baseline_dirs[-2] if len(env.baseline_dirs) > 1 else env.baseline_dirs[-1]
        fs = d / f"fs-{time.monotonic_ns()}"
        plain = self._plain(env)
        plain.copy_whole_root(fs)
        subprocess.run(["mount", "--bind", str(fs), str(fs)], check=True)
        try:
            plain.copy_changed(d / "snap", fs)
            kill_tree(plain.restore(d / "img", fs))
        finally:
            subprocess.run(["umount", "-l", str(fs)], check=False)
            subprocess.run(["rm", "-rf", "--one-file-system", str(fs)], check=False)

    def warm_up(self, backend: str) -> None:
        """One untimed round of sandbox work (first checkpoints, body doubles)."""
        self.start_round(-1, [[0]] * len(self.envs), backend,
                         [False] * len(self.envs)).wait()

    def close(self) -> None:
        """Destroy every sandbox; a failed destroy is raised (after trying the others), not
        swallowed: it would leave a sandbox behind that the next fleet's names collide with."""
        self.pool.shutdown(wait=True)
        failed = []
        for env in self.envs:
            for d in env.baseline_dirs:
                subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)
            try:
                env.sandbox.destroy()
            except Exception as e:  # noqa: BLE001 - the others are still destroyed
                failed.append(f"{env.sandbox.name}: {e!r}")
        if failed:
            raise RuntimeError(f"destroying the fleet failed: {'; '.join(failed)}")


class RoundHandle:
    """A round's sandbox work in flight: observations() waits for the execs only."""

    def __init__(self, n: int):
        self.observed: list[Future] = [Future() for _ in range(n)]
        self.done: list[Future] = []

    def observations(self) -> list[bytes]:
        return [f.result() for f in self.observed]

    def wait(self) -> None:
        for f in self.done:
            f.result()


def run_schedule(name: str, policy, fleet: Fleet, rounds: int, p_rollback: float,
                 rng: random.Random) -> dict:
    """One schedule over `rounds` rounds; policy has generate(prompts) -> token lists
    and train_step(), both returning once the device is done (synchronised)."""
    backend, overlapped = SCHEDULES[name]
    n = len(fleet.envs)
    policy.generate([e.observation for e in fleet.envs])  # warm-up, untimed
    policy.train_step()
    first_event = len(fleet.timeline.events)
    t_gen = t_train = 0.0
    pending: RoundHandle | None = None
    observations = [e.observation for e in fleet.envs]
    wall0 = time.perf_counter()
    for r in range(rounds):
        if pending is not None:
            observations = pending.observations()  # this round's prompts
        t0 = time.perf_counter()
        actions = policy.generate(observations)
        t1 = time.perf_counter()
        t_gen += t1 - t0
        fleet.timeline.record("generate", -1, t0, t1)
        if pending is not None:
            pending.wait()  # the previous round's checkpoints and rollbacks
        pending = fleet.start_round(r, actions, backend,
                                    [rng.random() < p_rollback for _ in range(n)])
        if not overlapped:
            pending.wait()
        t0 = time.perf_counter()
        policy.train_step()
        t1 = time.perf_counter()
        t_train += t1 - t0
        fleet.timeline.record("train", -1, t0, t1)
    t0 = time.perf_counter()
    pending.wait()  # the last round's sandbox work counts
    t_drain = time.perf_counter() - t0
    wall = time.perf_counter() - wall0
    events = fleet.timeline.events[first_event:]
    ops = {w: summary([1000 * (b - a) for ww, _, a, b in events if ww == w], 1)
           for w in ("exec", "checkpoint", "rollback")}
    return {"schedule": name, "envs": n, "rounds": rounds, "wall_s": wall,
            "t_gen_s": t_gen, "t_train_s": t_train, "t_wait_s": wall - t_gen - t_train,
            "t_drain_s": t_drain,
            "U": utilisation(t_gen, t_train, wall), "ops_ms": ops,
            "rollbacks": sum(1 for w, *_ in events if w == "rollback")}


def add_quiet_utilisation(runs: list[dict]) -> None:
    """U_quiet per run: the policy's undisturbed time per round (median over the runs
    whose policy phases had nothing in the background) x rounds / wall."""
    for n in {r["envs"] for r in runs}:
        quiet = [(r["t_gen_s"] + r["t_train_s"]) / r["rounds"] for r in runs
                 if r["envs"] == n and not SCHEDULES[r["schedule"]][1]]
        if not quiet:
            continue
        per_round = statistics.median(quiet)
        for r in runs:
            if r["envs"] == n:
                r["U_quiet"] = min(1.0, per_round * r["rounds"] / r["wall_s"])


def medians(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(str(r["envs"]), {}).setdefault(r["schedule"], []).append(r)
    keys = ("wall_s", "t_gen_s", "t_train_s", "t_wait_s", "t_drain_s", "U", "U_quiet")
    return {n: {s: {k: statistics.median(x[k] for x in rs) for k in keys
                    if all(k in x for x in rs)} | {"runs": len(rs)}
                for s, rs in by.items()} for n, by in out.items()}


# -- the driver -----------------------------------------------------------------------------

def split_cpus(n_policy: int) -> tuple[set[int], set[int]] | None:
    """(the policy's CPUs, everything else's) out of this process's affinity; None when
    pinning is off (0) or fewer than 2 CPUs would be left to the sandboxes."""
    cpus = sorted(os.sched_getaffinity(0))
    if n_policy <= 0 or len(cpus) < n_policy + 2:
        return None
    return set(cpus[:n_policy]), set(cpus[n_policy:])


def host_info() -> dict:
    return {"cpus": os.cpu_count(), "kernel": os.uname().release,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def run_all(args, policy, client, doc: dict, write, started: float) -> None:
    """Every env count, every repeat, the schedules in a random order. A run (or a fleet)
    is not started when the time it is expected to take -- the longest run so far, x 1.5
    for a bigger fleet -- would end more than --budget-s after `started` (monotonic). A
    run that fails is recorded with its error; a backend that failed is not run again."""
    order_rng = random.Random(args.seed)
    broken: dict[str, str] = {}  # backend -> its error
    run_s = setup_s = 0.0
    for n in args.envs:
        elapsed = time.monotonic() - started
        run_s, setup_s = 1.5 * run_s, 1.5 * setup_s
        if elapsed + setup_s + run_s > args.budget_s:
            doc["skipped"].append(f"{n} envs: {elapsed:.0f} s of --budget-s used")
            continue
        t0 = time.perf_counter()
        fleet = Fleet(client, n, full=args.mode == "full", workers=args.workers,
                      cpus=args.sandbox_cpus)
        try:
            for backend in ("deltabox", "baseline"):
                if any(SCHEDULES[s][0] == backend for s in args.schedules):
                    try:
                        fleet.warm_up(backend)
                    except Exception as e:  # noqa: BLE001 - recorded, the others go on
                        broken[backend] = f"warm-up with {n} envs: {e!r}"[:2000]
            setup_s = time.perf_counter() - t0
            doc["fleets"][str(n)] = {"create_and_warm_up_s": setup_s}
            for rep in range(args.repeats):
                order = list(args.schedules)
                order_rng.shuffle(order)
                for pos, name in enumerate(order):
                    elapsed = time.monotonic() - started
                    if SCHEDULES[name][0] in broken:
                        doc["skipped"].append(f"{n} envs, repeat {rep}, {name}: "
                                              f"{SCHEDULES[name][0]} failed")
                        continue
                    if elapsed + 1.1 * run_s > args.budget_s:
                        doc["skipped"].append(f"{n} envs, repeat {rep}, {name}: "
                                              f"{elapsed:.0f} s of --budget-s used")
                        continue
                    t1 = time.perf_counter()
                    try:
                        r = run_schedule(name, policy, fleet, args.rounds, args.p_rollback,
                                         random.Random(f"{args.seed}-{n}-{rep}-{name}"))
                    except Exception as e:  # noqa: BLE001 - recorded, the others go on
                        broken[SCHEDULES[name][0]] = f"{name}, {n} envs: {e!r}"[:2000]
                        print(f"{n:3d} envs  {name} failed: {e!r}", flush=True)
                        continue
                    took = time.perf_counter() - t1  # with its warm-up
                    run_s = took if rep == pos == 0 else max(run_s, took)
                    r.update(repeat=rep, position=pos, loadavg=os.getloadavg()[0])
                    doc["runs"].append(r)
                    print(f"{n:3d} envs  repeat {rep} #{pos} {name:11s} wall {r['wall_s']:7.2f}"
                          f" s  gen {r['t_gen_s']:6.2f}  train {r['t_train_s']:6.2f}  "
                          f"U {r['U']:.3f}", flush=True)
                    add_quiet_utilisation(doc["runs"])
                    doc["medians"] = medians(doc["runs"])
                    write()
            doc["fleets"][str(n)]["counts"] = dict(fleet.counts)
        finally:
            try:
                fleet.close()
            except RuntimeError as e:
                broken[f"close {n}"] = str(e)[:2000]
            doc["errors"] = broken
            write()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the result JSON (rewritten after each run)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tiny-model", action="store_true", help="the CPU smoke model (TINY)")
    ap.add_argument("--envs", default="16,64", help="env counts, comma-separated")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mode", choices=("full", "fs"), default="full")
    ap.add_argument("--p-rollback", type=float, default=0.2)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (128; tiny 16)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens (128; tiny 8)")
    ap.add_argument("--train-layers", type=int, default=4, help="0 = every layer")
    ap.add_argument("--train-batch", type=int, default=None, help="rollouts per step (16)")
    ap.add_argument("--workers", type=int, default=16, help="sandbox threads")
    ap.add_argument("--policy-cpus", type=int, default=2 if (os.cpu_count() or 1) >= 8 else 0,
                    help="cores of the policy's own, the rest to the sandboxes (0 = no pinning)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="start no run expected to end later than this after start-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--socket", help="use a running daemon instead of a throw-away one")
    args = ap.parse_args(argv)
    args.envs = [int(x) for x in args.envs.split(",")]
    args.schedules = [s for s in args.schedules.split(",") if s]
    unknown = set(args.schedules) - SCHEDULES.keys()
    if unknown:
        ap.error(f"unknown schedules {sorted(unknown)}")
    tiny = args.tiny_model
    args.prompt = args.prompt or (16 if tiny else 128)
    args.tokens = args.tokens or (8 if tiny else 128)
    args.train_batch = args.train_batch or (2 if tiny else 16)
    split = split_cpus(args.policy_cpus)
    args.policy_cpu_set, args.sandbox_cpus = split if split else (None, None)
    return args


def main(argv=None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        raise SystemExit("needs torch (the policy); the replay harness is gpu_harness.py") \
            from None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from gpu_policy import QWEN25_7B, TINY, Policy
    shape = TINY if args.tiny_model else QWEN25_7B
    out = Path(args.out)
    if args.policy_cpu_set:  # what this thread creates from now on inherits it
        os.sched_setaffinity(0, args.policy_cpu_set)
    doc = {"source": SOURCE, "command": shlex.join([sys.executable, *sys.argv]),
           "args": vars(args), "shape": shape, "host_start": host_info(),
           "torch": torch.__version__, "runs": [], "medians": {}, "fleets": {},
           "skipped": [], "errors": {},
           "cpus": {"policy": sorted(args.policy_cpu_set or ()),
                    "sandboxes": sorted(args.sandbox_cpus or ())}}

    def write() -> None:
        doc["host_end"] = host_info()
        out.write_text(json.dumps(doc, indent=2, default=str))

    t0 = time.perf_counter()
    policy = Policy(shape, args.device, prompt=args.prompt, tokens=args.tokens,
                    train_layers=args.train_layers, train_batch=args.train_batch,
                    seed=args.seed)
    policy.sync()
    doc["policy"] = {"params": policy.params, "trained_params": policy.trained_params,
                     "trained_layers": len(policy.layers) - policy.first_trained,
                     "device": policy.name(), "dtype": str(policy.dtype),
                     "build_s": time.perf_counter() - t0,
                     "training": "full forward; backward + SGD into the last "
                                 "trained_layers, the final norm and the LM head"}
    print(f"policy: {policy.params / 1e9:.2f} B parameters ({policy.trained_params / 1e6:.0f}"
          f" M trained) on {policy.name()}, built in {doc['policy']['build_s']:.1f} s",
          flush=True)
    import deltabox
    from deltabox.testing import ThrowawayDaemon
    daemon = None
    try:
        if args.socket:
            client = deltabox.Client(args.socket)
        else:
            if args.sandbox_cpus:  # the daemon and all it starts: the sandboxes' cores
                os.sched_setaffinity(0, args.sandbox_cpus)
            try:
                daemon = ThrowawayDaemon().start(timeout=60)
            finally:
                if args.policy_cpu_set:
                    os.sched_setaffinity(0, args.policy_cpu_set)
            client = daemon.client()
            client.import_image("tiny", TINY_TAR)
        with client:
            doc["daemon"] = {"version": client.status().version, "throwaway": daemon is not None}
            run_all(args, policy, client, doc, write, started)
    finally:
        if daemon is not None:
            if daemon.log_path.exists():  # cleanup() removes it
                out.with_suffix(".daemon.log").write_bytes(daemon.log_path.read_bytes()[-400_000:])
            left = daemon.cleanup()
            if left:
                doc["daemon_cleanup"] = left
        write()
    print(json.dumps(doc["medians"], indent=1))


if __name__ == "__main__":
    main()
