"""RL-style rollouts on DeltaBox, with sandbox work overlapped with generation.

    sudo .venv/bin/python rl_examples/rollouts.py [--socket PATH] [--envs 4] [--steps 8]

Each environment is a sandbox with a persistent bash session. A step is:
the policy generates an action (here a stand-in that takes --gen-ms; put your
model's generate() there), the action runs in the sandbox, and the sandbox is
checkpointed. With probability --p-fail an action "breaks" the environment and
the episode rolls back to the last good checkpoint -- the branching and
rewinding an RL trainer or tree search does all the time.

Two schedules are timed on the same work:
- sequential: generate, then checkpoint / rollback, one after the other;
- overlapped: the checkpoint of step t runs while the policy generates step t+1
  (AsyncClient), so the accelerator waits only for what is unfinished.

It prints the paper's utilisation U = (T_gen + T_train) / (T_sandbox + T_gen + T_train)
for both (T_train = 0 here; pass --train-ms to model a learner step per round).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import deltabox


class Clock:
    def __init__(self):
        self.gen = self.sandbox = self.train = 0.0

    def utilisation(self) -> float:
        busy = self.gen + self.train
        return busy / (busy + self.sandbox) if busy + self.sandbox else 0.0


async def generate(args, rng: random.Random) -> str:
    """Stand-in for the policy's generate(): returns a shell action."""
    await asyncio.sleep(args.gen_ms / 1000)
    n = rng.randint(0, 1000)
    if rng.random() < args.p_fail:
        return "rm -rf /work/state"  # a destructive action: needs a rollback
    return f"echo {n} >> /work/state/log && wc -l < /work/state/log"


async def episode(client, args, seed: int, overlapped: bool, clock: Clock) -> int:
    rng = random.Random(seed)
    async with await client.create("demo") as sbx:
        sh = await sbx.open_session("bash")
        await sh.run("mkdir -p /work/state && : > /work/state/log")
        good = await sbx.checkpoint("start", full=True)
        pending = None  # an in-flight checkpoint (overlapped mode)
        rollbacks = 0
        for step in range(args.steps):
            t0 = time.perf_counter()
            action = await generate(args, rng)  # the checkpoint of step t-1 runs meanwhile
            t1 = time.perf_counter()
            clock.gen += t1 - t0
            if pending is not None:
                good = await pending  # only what the generation did not hide is waited
                pending = None
                clock.sandbox += time.perf_counter() - t1
            result = await sh.run(action)
            t2 = time.perf_counter()
            if result.exit_code != 0 or "rm -rf" in action:
                await sbx.rollback(good)  # full checkpoint: the session comes back too
                rollbacks += 1
                clock.sandbox += time.perf_counter() - t2
                continue
            if overlapped:
                pending = asyncio.ensure_future(sbx.checkpoint(f"step {step}", full=True))
            else:
                good = await sbx.checkpoint(f"step {step}", full=True)
            clock.sandbox += time.perf_counter() - t2
            if args.train_ms:
                await asyncio.sleep(args.train_ms / 1000)
                clock.train += args.train_ms / 1000
        if pending is not None:
            await pending
        return rollbacks


async def run(args) -> None:
    async with deltabox.AsyncClient(args.socket) as client:
        for overlapped in (False, True):
            clock = Clock()
            t0 = time.perf_counter()
            rollbacks = await asyncio.gather(*(episode(client, args, seed, overlapped, clock)
                                               for seed in range(args.envs)))
            wall = time.perf_counter() - t0
            name = "overlapped" if overlapped else "sequential"
            print(f"{name:10s}: {args.envs} envs x {args.steps} steps in {wall:6.2f} s, "
                  f"rollbacks {sum(rollbacks)}, T_gen {clock.gen:6.2f} s, "
                  f"T_sandbox {clock.sandbox:6.2f} s, U = {clock.utilisation():.2f}")


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
