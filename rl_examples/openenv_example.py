"""An OpenEnv server over DeltaBox (`deltabox.adapters.openenv`, 'deltabox[openenv]').

    sudo .venv/bin/python rl_examples/openenv_example.py [--socket PATH] [--sessions 4]
        [--rounds 3] [--files 2000]
    sudo .venv/bin/python rl_examples/openenv_example.py --serve --port 8000   # serve only

The task is prepared once (`SandboxTask`: /work/add.sh subtracts where it should add; a
root checkpoint), and OpenEnv's own `create_app` serves it under uvicorn: every WebSocket
session gets a `SandboxEnvironment` forked from that root. `--sessions` clients
(OpenEnv's `EnvClient`, one thread each) then run a scripted "policy" at once: look,
checkpoint (an `op="checkpoint"` action), try an edit, roll back over the wire when the
test still fails, then apply the right fix. The reward is read from the sandbox (the test
passes). Prints each session's reward and the client-side p50/p95 of the first reset (the
session's fork), a command, and a rollback; baseline, same run: a fresh sandbox per
session, created and set up (rl_examples/add_task.py). Put your model where `policy` is.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import deltabox
from deltabox.adapters.openenv import SandboxAction, SandboxClient, SandboxTask, serve
from deltabox.stats import p50_p95

from add_task import TEST, fresh_sandboxes_ms, setup


def fixed(sbx, result) -> float:
    return float(sbx.exec(["/bin/sh", "-c", TEST]).ok)


def policy(session: int) -> list[SandboxAction]:
    """The scripted policy: an edit after a checkpoint (per session one of three wrong
    ones or the right one)."""
    risky = ["sed -i 's/ - / * /' /work/add.sh", "rm /work/add.sh",
             "sed -i 's/echo/true/' /work/add.sh", "sed -i 's/ - / + /' /work/add.sh"][session % 4]
    return [SandboxAction(command="cat /work/add.sh"), SandboxAction(op="checkpoint"),
            SandboxAction(command=risky), SandboxAction(command=TEST)]


def run_session(url: str, session: int, times: dict) -> float:
    with SandboxClient(base_url=url).sync() as env:
        t0 = time.perf_counter()
        env.reset()
        times["reset"].append((time.perf_counter() - t0) * 1e3)
        checkpoint, result = "", None
        for action in policy(session):
            t0 = time.perf_counter()
            result = env.step(action)
            if action.op == "exec":
                times["command"].append((time.perf_counter() - t0) * 1e3)
            checkpoint = result.observation.checkpoint_id or checkpoint
        if result.observation.exit_code != 0:  # the risky edit failed the test: undo it
            t0 = time.perf_counter()
            env.step(SandboxAction(op="rollback", checkpoint_id=checkpoint))
            times["rollback"].append((time.perf_counter() - t0) * 1e3)
            result = env.step(SandboxAction(command="sed -i 's/ - / + /' /work/add.sh"))
        return result.reward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --sessions sessions")
    ap.add_argument("--files", type=int, default=2000, help="workspace files the setup writes")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--serve", action="store_true", help="only serve, until interrupted")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    with deltabox.Client(args.socket) as client:
        task = SandboxTask(client, "tiny", setup=lambda sbx: setup(sbx, args.files),
                           reward_fn=fixed, max_steps=16)
        try:
            with serve(task, port=args.port, max_sessions=args.sessions) as served:
                if args.serve:
                    print(f"serving on {served.url} (WebSocket /ws; Ctrl-C stops)", flush=True)
                    try:
                        served.thread.join()
                    except KeyboardInterrupt:
                        pass
                    return
                times = {"reset": [], "command": [], "rollback": [], "baseline": []}
                with ThreadPoolExecutor(args.sessions) as pool:
                    for _ in range(args.rounds):
                        rewards = list(pool.map(lambda i: run_session(served.url, i, times),
                                                range(args.sessions)))
                        times["baseline"] += fresh_sandboxes_ms(client, args.sessions, args.files)
        finally:
            task.close()
    result = {"sessions": args.sessions, "files": args.files, "rewards": rewards,
              **{f"{k}_ms_p50_p95": p50_p95(v) for k, v in times.items() if v},
              "rollbacks": len(times["rollback"]) // args.rounds}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.rounds} rounds of {args.sessions} concurrent sessions, each a fork of the "
          f"task's root; last round's rewards {rewards}")
    for what, label in (("reset", "first reset (session = fork)"), ("command", "command"),
                        ("rollback", "rollback op"),
                        ("baseline", "baseline: fresh sandbox + setup")):
        if times[what]:
            p50, p95 = result[f"{what}_ms_p50_p95"]
            print(f"{label:<32} ms: p50 {p50:7.1f}  p95 {p95:7.1f}  n={len(times[what])}")


if __name__ == "__main__":
    main()
