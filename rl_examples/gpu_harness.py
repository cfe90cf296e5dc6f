"""GPU-utilisation harness: how much of the accelerator's time the sandbox costs.

    python rl_examples/gpu_harness.py --samples LAT.json --out RESULT.json
        [--steps 20] [--repeats 3] [--device cuda|cpu] [--p-fail 1.0]

Until an end-to-end RL run replaces it, this harness replays measured sandbox
latencies next to real policy work. The metric is U = (T_gen + T_train) / wall: the
share of wall time the policy's accelerator does useful work, measured with wall
clocks around real (synchronised) work, not computed from a formula.

The policy is a decoder-only transformer with a KV cache, randomly initialised (no
weights to download): per step it generates an action token by token, and one
training step follows. The sandbox side comes from `--samples`, the JSON that
`rl_examples/sandbox_latencies.py` writes on the sandbox host (milliseconds per
operation, same sample count for DeltaBox and the baseline):
  action                 the action's own run time in the sandbox (every schedule)
  checkpoint / rollback  DeltaBox; `rollback` is sampled right after the checkpoint
                         and a step, with no wait for the body double
  baseline_*             plain `criu dump`/`criu restore` + `cp --reflink` of the
                         changed files, the same tree
Per step: generate -> run the action (waited: its output is the next observation) ->
checkpoint, and with probability --p-fail a rollback -> train. Four schedules:
  baseline / sequential  checkpoint (+ rollback) waited for before training
  baseline-overlapped /  checkpoint (+ rollback) issued and left pending across the
  overlapped             training step and the next generation; the next action
                         waits only for what they did not hide
Each replayed operation is real work for its sampled duration in a separate worker
process that keeps one CPU core busy (as CRIU does on a host that runs the sandbox):
the waits compete for the machine's CPU like a real pending call would, and the
same worker serves every schedule. Each schedule starts with an untimed warm-up (one
generation and one training step). The schedules run in a random order (--seed),
--repeats times; the table shows each schedule's median over the repeats, and the
JSON keeps every run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import time
from pathlib import Path

SCHEDULES = {  # name -> (which samples, overlapped)
    "baseline": ("baseline", False),
    "baseline-overlapped": ("baseline", True),
    "sequential": ("deltabox", False),
    "overlapped": ("deltabox", True),
}


def _spin_worker(conn) -> None:
    """Keeps a core busy for each requested duration, then answers."""
    while True:
        seconds = conn.recv()
        if seconds is None:
            return
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        conn.send(True)


class SandboxReplay:
    """Replays sampled sandbox operations as real CPU work in a worker process."""

    def __init__(self):
        self._conn, child = mp.Pipe()
        # fork, before torch starts CUDA (main() makes it first): the worker only spins.
        self._proc = mp.get_context("fork").Process(target=_spin_worker, args=(child,),
                                                    daemon=True)
        self._proc.start()
        self._pending = False

    def start(self, seconds: float) -> None:
        assert not self._pending
        self._conn.send(seconds)
        self._pending = True

    def wait(self) -> None:
        if self._pending:
            self._conn.recv()
            self._pending = False

    def run(self, seconds: float) -> None:
        self.start(seconds)
        self.wait()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(5)


def load_samples(path: str) -> dict[str, dict[str, list[float]]]:
    """{"deltabox": {op: seconds}, "baseline": {op: seconds}} from sandbox_latencies.py."""
    ms = json.loads(Path(path).read_text())["samples_ms"]
    sec = {op: [x / 1000 for x in xs] for op, xs in ms.items()}
    missing = {"action", "checkpoint", "rollback", "baseline_checkpoint",
               "baseline_rollback"} - sec.keys()
    if missing:
        raise SystemExit(f"{path}: no samples for {sorted(missing)} "
                         "(re-run rl_examples/sandbox_latencies.py)")
    ours = {"action": sec["action"], "checkpoint": sec["checkpoint"],
            "rollback": sec["rollback"]}
    base = {"action": sec["action"], "checkpoint": sec["baseline_checkpoint"],
            "rollback": sec["baseline_rollback"]}
    return {"deltabox": ours, "baseline": base}


class Policy:
    """A decoder-only transformer on `device`: generate() and train_step(), synchronised."""

    def __init__(self, args):
        # torch is imported here, not at the top: the schedules and the replay can then
        # be imported (and tested) on a machine without it.
        import torch
        from torch import nn
        import torch.nn.functional as F
        self.torch, self.F, self.args = torch, F, args
        self.device = torch.device(args.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

        class Block(nn.Module):
            def __init__(self, d: int, heads: int):
                super().__init__()
                self.heads = heads
                self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.qkv = nn.Linear(d, 3 * d, bias=False)
                self.proj = nn.Linear(d, d, bias=False)
                self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

            def forward(self, x, cache=None):
                b, t, d = x.shape
                q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads,
                                                     d // self.heads).unbind(2)
                q, k, v = (z.transpose(1, 2) for z in (q, k, v))
                if cache is not None:
                    if cache:
                        k = torch.cat([cache["k"], k], 2)
                        v = torch.cat([cache["v"], v], 2)
                    cache["k"], cache["v"] = k, v
                y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or t > 1)
                x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
                return x + self.mlp(self.ln2(x))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(args.vocab, args.d)
                self.blocks = nn.ModuleList(Block(args.d, args.heads)
                                            for _ in range(args.layers))
                self.ln = nn.LayerNorm(args.d)
                self.head = nn.Linear(args.d, args.vocab, bias=False)

            def forward(self, ids, caches=None):
                x = self.emb(ids)
                for i, blk in enumerate(self.blocks):
                    x = blk(x, None if caches is None else caches[i])
                return self.head(self.ln(x))

        torch.manual_seed(0)
        self.net = Net().to(self.device, dtype)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-4)
        self.params = sum(p.numel() for p in self.net.parameters())
        self.prompt = torch.randint(0, args.vocab, (args.batch, args.prompt),
                                    device=self.device)

    def name(self) -> str:
        if self.device.type == "cuda":
            return self.torch.cuda.get_device_name(self.device)
        return "cpu"

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def generate(self) -> None:
        torch, F = self.torch, self.F
        with torch.no_grad():
            caches = [{} for _ in self.net.blocks]
            logits = self.net(self.prompt, caches)
            ids = logits[:, -1:].argmax(-1)
            for _ in range(self.args.tokens - 1):
                logits = self.net(ids, caches)
                ids = torch.multinomial(F.softmax(logits[:, -1].float(), -1), 1)
        self.sync()

    def train_step(self) -> None:
        a = self.args
        ids = self.torch.randint(0, a.vocab, (a.batch, a.prompt + a.tokens), device=self.device)
        logits = self.net(ids[:, :-1]).flatten(0, 1).float()
        loss = self.F.cross_entropy(logits, ids[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()


def run_schedule(name: str, policy, replay: SandboxReplay, samples: dict, args,
                 rng: random.Random) -> dict:
    """One schedule, wall-clocked from the first generation to the last wait."""
    which, overlapped = SCHEDULES[name]
    ops = samples[which]
    policy.generate()  # warm-up, untimed: every schedule starts equally warm
    policy.train_step()
    t_gen = t_train = 0.0
    wall0 = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        policy.generate()  # the previous step's checkpoint may run meanwhile
        t_gen += time.perf_counter() - t0
        replay.wait()  # what the training and the generation did not hide
        replay.run(rng.choice(ops["action"]))  # its output is the next observation
        sandbox = rng.choice(ops["checkpoint"])
        if rng.random() < args.p_fail:
            sandbox += rng.choice(ops["rollback"])
        if overlapped:
            replay.start(sandbox)
        else:
            replay.run(sandbox)
        t0 = time.perf_counter()
        policy.train_step()
        t_train += time.perf_counter() - t0
    replay.wait()  # the last step's checkpoint counts
    wall = time.perf_counter() - wall0
    return {"schedule": name, "steps": args.steps, "wall_s": wall, "t_gen_s": t_gen,
            "t_train_s": t_train, "t_wait_s": wall - t_gen - t_train,
            "U": (t_gen + t_train) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", required=True, help="JSON from sandbox_latencies.py")
    ap.add_argument("--out", help="write every run and the medians here (JSON)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-fail", type=float, default=1.0,
                    help="probability that a step also rolls back (1.0: every step)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        raise SystemExit("needs torch (pip install torch)") from None
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    samples = load_samples(args.samples)
    replay = SandboxReplay()
    policy = Policy(args)
    order_rng = random.Random(args.seed)
    runs = []
    try:
        for rep in range(args.repeats):
            order = list(SCHEDULES)
            order_rng.shuffle(order)
            for name in order:
                r = run_schedule(name, policy, replay, samples, args,
                                 random.Random(f"{args.seed}-{rep}-{name}"))
                r.update(repeat=rep, position=order.index(name))
                runs.append(r)
                print(f"repeat {rep} #{r['position']} {name:20s} U {r['U']:.3f}", flush=True)
    finally:
        replay.close()
    medians = {name: {k: statistics.median(r[k] for r in runs if r["schedule"] == name)
                      for k in ("wall_s", "t_gen_s", "t_train_s", "t_wait_s", "U")}
               for name in SCHEDULES}
    print(f"policy: {policy.params / 1e6:.0f}M parameters, batch {args.batch}, "
          f"{args.tokens} tokens per action, {policy.name()}; {args.steps} steps, "
          f"p_fail {args.p_fail}, median of {args.repeats} runs in random order")
    print(f"{'schedule':20s} {'wall s':>8s} {'T_gen':>8s} {'T_train':>8s} {'waited':>8s} "
          f"{'U':>6s}")
    for name, m in medians.items():
        print(f"{name:20s} {m['wall_s']:8.2f} {m['t_gen_s']:8.2f} {m['t_train_s']:8.2f}"
              f" {m['t_wait_s']:8.2f} {m['U']:6.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"params": policy.params, "device": policy.name(), "args": vars(args),
             "samples_file": args.samples, "medians": medians, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
