"""RL-style rollouts on DeltaBox: how long the policy waits for the sandboxes.

    sudo .venv/bin/python rl_examples/rollouts.py [--socket PATH] [--envs 4] [--steps 8]

A batch of --envs environments, each a sandbox with a persistent bash session, is
driven by one policy (one accelerator). A round is:
  1. the policy generates one action per environment (a stand-in that takes --gen-ms;
     put your model's batched generate() there): the accelerator is busy;
  2. every environment runs its action, then the environment is *checked* (a command
     in the sandbox: the state file exists and holds only numbers). With probability
     --p-fail an action is destructive (it deletes or corrupts the state), the check
     fails, and the environment rolls back to its last good full checkpoint -- files
     and the bash session together; otherwise it is checkpointed;
  3. a learner step of --train-ms (0 by default): the accelerator is busy.

Two schedules run the same actions (same seeds):
- sequential: each round waits for its checkpoints before the next generation;
- overlapped: the checkpoints of round t run while the policy generates round t+1
  (AsyncClient); the next action waits only for the unfinished part.

Everything is measured on the wall clock of the whole batch: T_gen and T_train are the
wall time of the generation and learner phases, `wall` is first generation to last
checkpoint acknowledged (the last round's checkpoints are waited for and counted), and
U = (T_gen + T_train) / wall is the share of time the accelerator works. The
per-operation latencies (client-side, p50/p95) are printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import deltabox
from deltabox.stats import summary

STATE = "/work/state"
# The environment is healthy when its state file exists and holds only numbers.
CHECK = f"test -f {STATE}/log && ! grep -qvE '^[0-9]+$' {STATE}/log"
DESTRUCTIVE = [f"rm -rf {STATE}", f"echo corrupted > {STATE}/log", f"rm -f {STATE}/log"]


@dataclass
class Latencies:
    """Client-side milliseconds per sandbox operation, over all environments."""
    ms: dict[str, list[float]] = field(default_factory=lambda: {
        "action": [], "check": [], "checkpoint": [], "rollback": []})
    rollback_paths: Counter = field(default_factory=Counter)  # "double", "double-waited", ...

    async def timed(self, op: str, coro):
        t0 = time.perf_counter()
        out = await coro
        self.ms[op].append(1000 * (time.perf_counter() - t0))
        return out


class Environment:
    """One sandbox, its bash session and its last good checkpoint."""

    def __init__(self, sbx, sh, good, seed: int, lat: Latencies):
        self.sbx, self.sh, self.good = sbx, sh, good
        self.rng = random.Random(seed)
        self.lat = lat
        self.pending: asyncio.Task | None = None  # an in-flight checkpoint (overlapped)
        self.rollbacks = 0

    @classmethod
    async def create(cls, client, seed: int, lat: Latencies) -> "Environment":
        sbx = await client.create("demo")
        try:
            sh = await sbx.open_session("bash")
            await sh.run(f"mkdir -p {STATE} && : > {STATE}/log")
            good = await sbx.checkpoint("start", full=True)
        except BaseException:
            await sbx.destroy()  # not left behind
            raise
        return cls(sbx, sh, good, seed, lat)

    def propose(self, p_fail: float) -> str:
        """The action the policy 'generated' for this environment."""
        if self.rng.random() < p_fail:
            return self.rng.choice(DESTRUCTIVE)
        return f"echo {self.rng.randint(0, 1000)} >> {STATE}/log"

    async def settle(self) -> None:
        """Wait for the checkpoint still in flight, if any (it becomes the good one)."""
        if self.pending is not None:
            self.good = await self.pending
            self.pending = None

    async def step(self, action: str, step: int, overlapped: bool) -> None:
        await self.settle()
        await self.lat.timed("action", self.sh.run(action))
        healthy = (await self.lat.timed("check", self.sh.run(CHECK))).exit_code == 0
        if not healthy:
            res = await self.lat.timed("rollback", self.sbx.rollback(self.good))
            self.lat.rollback_paths[str(res.path)] += 1
            self.rollbacks += 1
            if (await self.sh.run(CHECK)).exit_code != 0:  # untimed: the example's own test
                raise RuntimeError(f"{self.sbx.id}: still broken after a rollback")
            return
        ckpt = self.lat.timed("checkpoint", self.sbx.checkpoint(f"step {step}", full=True))
        if overlapped:
            self.pending = asyncio.ensure_future(ckpt)
        else:
            self.good = await ckpt


async def destroy_all(envs: list[Environment]) -> None:
    """Destroy every environment's sandbox; the destroys that failed are raised together
    (after trying all), not swallowed."""
    results = await asyncio.gather(*(env.sbx.destroy() for env in envs),
                                   return_exceptions=True)
    failed = [f"{env.sbx.name}: {r!r}" for env, r in zip(envs, results)
              if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"destroying the environments failed: {'; '.join(failed)}")


async def generate(envs: list[Environment], args) -> list[str]:
    """Stand-in for the policy's batched generate(): one action per environment."""
    await asyncio.sleep(args.gen_ms / 1000)
    return [env.propose(args.p_fail) for env in envs]


async def run_schedule(client, args, overlapped: bool) -> dict:
    lat = Latencies()
    made = await asyncio.gather(*(Environment.create(client, seed, lat)
                                  for seed in range(args.envs)), return_exceptions=True)
    envs = [e for e in made if isinstance(e, Environment)]
    failed = [e for e in made if not isinstance(e, Environment)]
    if failed:  # every create was waited for: the ones made are destroyed, none leaks
        try:
            await destroy_all(envs)
        except RuntimeError as e:  # the create's error is the one to raise
            failed[0].add_note(str(e))
        raise failed[0]
    try:
        t_gen = t_train = 0.0
        t0 = time.perf_counter()
        for step in range(args.steps):
            g0 = time.perf_counter()
            actions = await generate(envs, args)  # round t-1's checkpoints run meanwhile
            t_gen += time.perf_counter() - g0
            await asyncio.gather(*(env.step(a, step, overlapped)
                                   for env, a in zip(envs, actions)))
            if args.train_ms:
                l0 = time.perf_counter()
                await asyncio.sleep(args.train_ms / 1000)  # stand-in for the learner step
                t_train += time.perf_counter() - l0
        await asyncio.gather(*(env.settle() for env in envs))  # the last round's waits count
        wall = time.perf_counter() - t0
    finally:
        await destroy_all(envs)
    return {"schedule": "overlapped" if overlapped else "sequential", "wall_s": wall,
            "t_gen_s": t_gen, "t_train_s": t_train, "U": (t_gen + t_train) / wall,
            "rollbacks": sum(env.rollbacks for env in envs),
            "rollback_paths": dict(lat.rollback_paths),
            "latency_ms": {op: summary(xs, 1) for op, xs in lat.ms.items()}}


async def run(args) -> None:
    async with deltabox.AsyncClient(args.socket) as client:
        results = [await run_schedule(client, args, overlapped) for overlapped in (False, True)]
    print(f"{args.envs} environments x {args.steps} rounds, generation {args.gen_ms:.0f} ms, "
          f"learner {args.train_ms:.0f} ms, p_fail {args.p_fail}")
    print(f"{'schedule':11s} {'wall s':>7s} {'T_gen s':>8s} {'T_train s':>9s} "
          f"{'waited s':>9s} {'U':>5s} {'rollbacks':>9s}")
    for r in results:
        idle = r["wall_s"] - r["t_gen_s"] - r["t_train_s"]
        print(f"{r['schedule']:11s} {r['wall_s']:7.2f} {r['t_gen_s']:8.2f} "
              f"{r['t_train_s']:9.2f} {idle:9.2f} {r['U']:5.2f} {r['rollbacks']:9d}")
    print("client-side latency per operation, ms (p50 / p95, n):")
    for r in results:
        cells = [f"{op} {s['p50']}/{s['p95']} (n={s['n']})"
                 for op, s in r["latency_ms"].items() if s["n"]]
        print(f"  {r['schedule']:11s} " + ", ".join(cells)
              + f"; rollback paths {r['rollback_paths']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--envs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gen-ms", type=float, default=300.0)
    ap.add_argument("--train-ms", type=float, default=0.0)
    ap.add_argument("--p-fail", type=float, default=0.2)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
