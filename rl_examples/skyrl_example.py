"""GRPO groups on SkyRL-Gym over DeltaBox (`deltabox.adapters.skyrl`, 'deltabox[skyrl]').

    sudo .venv/bin/python rl_examples/skyrl_example.py [--socket PATH] [--groups 3] [--files 2000]

The task, a tiny SWE task: /work/add.sh subtracts where it should add; the test
(`sh /work/add.sh 2 3` prints 5) gives the reward when the model says <submit/>. The env
is made the way SkyRL's trainer makes it, `skyrl_gym.make("deltabox-sandbox", ...)`,
and driven with `init()` / `step()` only. Per group: `init()` (a rollback to the task's
root), `fork(4)` -- four trajectories from that one state -- each driven by a scripted
"policy" (a fixed list of model replies: a right fix, a wrong fix, a destructive one, a
format slip then the fix), rewards turned into GRPO advantages. After the group,
`init()` on the parent shows the root is untouched. Baseline, same run: starting the
group as four fresh sandboxes, each set up (rl_examples/add_task.py). Put your model's
generate() where `SCRIPTS` is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import skyrl_gym

import deltabox
from deltabox.adapters.skyrl import ENV_ID
from deltabox.stats import p50_p95

from add_task import TEST, fresh_sandboxes_ms, setup_script


def bash(command: str) -> str:
    return f"I'll run:\n```bash\n{command}\n```"


SCRIPTS = {  # trajectory name -> the model's replies, in order
    "right fix": [bash("cat /work/add.sh"), bash("sed -i 's/ - / + /' /work/add.sh"),
                  bash(TEST), "<submit/>"],
    "wrong fix": [bash("sed -i 's/ - / * /' /work/add.sh"), "<submit/>"],
    "destructive": [bash("rm -rf /work"), bash("ls /work"), "<submit/>"],
    "format slip": ["The bug is the minus sign.", bash("sed -i 's/-/+/' /work/add.sh"),
                    "<submit/>"],
}


def run_group(env) -> dict:
    """One GRPO group: n trajectories forked from the task's root."""
    t0 = time.perf_counter()
    env.init([{"role": "user", "content": "Fix /work/add.sh so that it adds."}])
    init_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    group = env.fork(len(SCRIPTS))
    fork_ms = (time.perf_counter() - t0) * 1e3
    rewards, turns, step_ms = [], [], []
    try:
        for child, replies in zip(group, SCRIPTS.values()):
            for reply in replies:
                t0 = time.perf_counter()
                out = child.step(reply)
                step_ms.append((time.perf_counter() - t0) * 1e3)
                if out["done"]:
                    break
            rewards.append(out["reward"])
            turns.append(child.turns)
    finally:
        for child in group:
            child.close()
    mean, std = statistics.mean(rewards), statistics.pstdev(rewards) or 1.0
    return {"rewards": rewards, "advantages": [round((r - mean) / std, 3) for r in rewards],
            "turns": turns, "init_ms": init_ms, "fork_ms": fork_ms, "step_ms": step_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--files", type=int, default=2000, help="workspace files the setup writes")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    with deltabox.Client(args.socket) as client:
        env = skyrl_gym.make(ENV_ID, env_config={"image": "tiny", "max_turns": 6},
                             client=client,
                             extras={"setup": setup_script(args.files),
                                     "reward_spec": {"test": TEST}})
        try:
            groups = [run_group(env) for _ in range(args.groups)]
            fresh_ms = [max(fresh_sandboxes_ms(client, len(SCRIPTS), args.files))
                        for _ in range(args.groups)]
            env.init([])
            root_intact = env.sandbox.exec(["/bin/sh", "-c", f"! {{ {TEST}; }}"]).ok \
                and env.sandbox.exec("test -x /work/add.sh").ok
        finally:
            env.close()
    init_ms = [g["init_ms"] for g in groups]
    fork_ms = [g["fork_ms"] for g in groups]
    step_ms = [s for g in groups for s in g["step_ms"]]
    result = {"trajectories": list(SCRIPTS), "rewards": groups[-1]["rewards"],
              "advantages": groups[-1]["advantages"], "turns": groups[-1]["turns"],
              "groups": args.groups, "files": args.files, "root_intact": root_intact,
              "init_ms_p50_p95": p50_p95(init_ms), "fork_ms_p50_p95": p50_p95(fork_ms),
              "step_ms_p50_p95": p50_p95(step_ms),
              "baseline_fresh_group_ms_p50_p95": p50_p95(fresh_ms)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'trajectory':<12} {'reward':>6} {'advantage':>9} {'turns':>5}")
    for name, r, a, t in zip(SCRIPTS, result["rewards"], result["advantages"],
                             result["turns"]):
        print(f"{name:<12} {r:>6.1f} {a:>9.3f} {t:>5}")
    for what in ("init", "fork", "step"):
        p50, p95 = result[f"{what}_ms_p50_p95"]
        print(f"{what} ms: p50 {p50:.1f}  p95 {p95:.1f}")
    p50, p95 = result["baseline_fresh_group_ms_p50_p95"]
    print(f"baseline, {len(SCRIPTS)} fresh sandboxes + setup ms: p50 {p50:.1f}  p95 {p95:.1f}")
    print(f"{args.groups} groups of {len(SCRIPTS)}; root intact after them: {root_intact}")


if __name__ == "__main__":
    main()
