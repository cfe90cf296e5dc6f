"""DeltaBox sandboxes as gymnasium environments (`deltabox.gym`, `pip install 'deltabox[gym]'`).

    sudo .venv/bin/python rl_examples/gym_example.py [--socket PATH] [--envs 8] [--steps 12]

The task: /work/nums.txt holds numbers; the episode is solved when /work/answer holds
their sum. The "policy" picks among a few shell commands (one right, some wrong, one
destructive); put your model's generate() where `policy` is.

1. Search with one `SandboxEnv`: `fork(n)` gives one env per candidate action from the
   same state, each is scored by the reward function (which reads the sandbox), the best
   is kept, and `reset()` shows the root is untouched by any of it.
2. Rollouts with `SandboxVectorEnv`: --envs sandboxes stepped as one batch (one ExecMany
   per step); `step_async` lets the policy choose the next actions while the sandboxes
   run; an env that solves the task or reaches max_steps is reset (a rollback) on its
   next step.
"""

from __future__ import annotations

import argparse
import random
import time

import deltabox
from deltabox.gym import SandboxEnv, SandboxVectorEnv

NUMS = [17, 4, 21]
CANDIDATES = [
    "awk '{s += $1} END {print s}' /work/nums.txt > /work/answer",   # right
    "sort -n /work/nums.txt | tail -n 1 > /work/answer",              # the largest
    "echo 0 > /work/answer",
    "rm -rf /work",                                                   # destructive
]


def setup(sbx) -> None:
    sbx.write_file("/work/nums.txt", "".join(f"{n}\n" for n in NUMS), make_parents=True)


async def setup_async(sbx) -> None:
    await sbx.write_file("/work/nums.txt", "".join(f"{n}\n" for n in NUMS), make_parents=True)


def solved(sbx, result) -> float:
    r = sbx.exec(["cat", "/work/answer"])
    return float(r.ok and r.stdout.strip() == str(sum(NUMS)).encode())


async def solved_async(sbx, result) -> float:
    r = await sbx.exec(["cat", "/work/answer"])
    return float(r.ok and r.stdout.strip() == str(sum(NUMS)).encode())


def search(client) -> dict:
    """Score every candidate from the root, each in its own fork."""
    env = SandboxEnv(client, "tiny", setup=setup, reward_fn=solved)
    try:
        env.reset()
        children = env.fork(len(CANDIDATES))
        try:
            rewards = [child.step(action)[1] for child, action in zip(children, CANDIDATES)]
        finally:
            for child in children:
                child.close()
        best = max(range(len(CANDIDATES)), key=rewards.__getitem__)
        env.reset()
        root_intact = env.sandbox.read_file("/work/nums.txt") == b"17\n4\n21\n"
        return {"rewards": rewards, "best": CANDIDATES[best], "root_intact": root_intact}
    finally:
        env.close()


def rollouts(socket, envs: int, steps: int, seed: int = 0, think_s: float = 0.02) -> dict:
    """Random-policy rollouts over a vector env; the policy thinks while the batch runs."""
    rng = random.Random(seed)

    def policy() -> list[str]:
        time.sleep(think_s)  # stand-in for a batched generate()
        return [rng.choice(CANDIDATES) for _ in range(envs)]

    venv = SandboxVectorEnv(envs, "tiny", socket=socket, setup=setup_async,
                            reward_fn=solved_async, max_steps=3)
    solved_count, t0 = 0, time.perf_counter()
    try:
        venv.reset(seed=seed)
        actions = policy()
        for _ in range(steps):
            venv.step_async(actions)
            actions = policy()            # overlaps the sandboxes' step
            _, rewards, _, _, _ = venv.step_wait()
            solved_count += int(rewards.sum())
    finally:
        venv.close()
    wall = time.perf_counter() - t0
    return {"envs": envs, "steps": steps, "solved_steps": solved_count,
            "env_steps_per_s": envs * steps / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--envs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    with deltabox.Client(args.socket) as client:
        s = search(client)
    print(f"search: rewards {s['rewards']} -> best {s['best']!r}; root intact: "
          f"{s['root_intact']}")
    r = rollouts(args.socket, args.envs, args.steps)
    print(f"rollouts: {r['envs']} envs x {r['steps']} steps, {r['solved_steps']} rewarded "
          f"steps, {r['env_steps_per_s']:.1f} env-steps/s")


if __name__ == "__main__":
    main()
