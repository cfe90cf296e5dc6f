"""GPU-utilisation harness: how much of the accelerator's time the sandbox costs.

    python rl_examples/gpu_harness.py --latencies LAT.json [--steps 20] [--json OUT]

The paper's metric is U = (T_gen + T_train) / (T_sandbox + T_gen + T_train): the
share of wall time the policy's accelerator does useful work. This harness runs
a real policy-sized model on the GPU -- a decoder-only transformer with a KV
cache, randomly initialised (no weights to download), generating actions token
by token, and one training step per round -- and, between generations, waits
for the sandbox exactly as long as DeltaBox's measured operations take
(`--latencies`: the JSON written by `rl_examples/sandbox_latencies.py` on the
sandbox host, in milliseconds: per-operation samples). Three schedules:

  baseline     the sandbox operation users have today (CRIU dump/restore +
               copytree, from the same JSON), waited for after each generation
  sequential   DeltaBox's checkpoint/rollback, waited for after each generation
  overlapped   DeltaBox's checkpoint issued as the next generation starts: the
               GPU waits only for the part the generation did not hide

U is measured from wall clocks around real CUDA work (synchronised), not
computed from a formula; the waits are real sleeps of sampled durations.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            if cache:
                k = torch.cat([cache["k"], k], 2)
                v = torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or t > 1)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class Policy(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, caches=None):
        x = self.emb(ids)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.head(self.ln(x))

    @torch.no_grad()
    def generate(self, prompt, new_tokens: int):
        caches = [{} for _ in self.blocks]
        logits = self(prompt, caches)
        ids = logits[:, -1:].argmax(-1)
        for _ in range(new_tokens - 1):
            logits = self(ids, caches)
            ids = torch.multinomial(F.softmax(logits[:, -1].float(), -1), 1)
        return ids


def load_latencies(path: str) -> dict[str, list[float]]:
    with open(path) as f:
        data = json.load(f)
    return {k: [float(x) for x in v] for k, v in data["samples_ms"].items()}


def run_schedule(name, model, opt, args, sandbox_ms, rng) -> dict:
    """Real generation + training on the GPU, real waits for the sandbox."""
    dev = "cuda"
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), device=dev)
    t_gen = t_train = t_wait = 0.0
    pending: threading.Thread | None = None
    wall0 = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        model.generate(prompt, args.tokens)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        t_gen += t1 - t0
        if pending is not None:  # overlapped: what the generation did not hide
            pending.join()
            pending = None
        t2 = time.perf_counter()
        t_wait += t2 - t1
        wait = sum(rng.choice(sandbox_ms[op]) for op in args.ops) / 1000
        if name == "overlapped":
            pending = threading.Thread(target=time.sleep, args=(wait,))
            pending.start()
        else:
            time.sleep(wait)
            t_wait += wait
        t3 = time.perf_counter()
        ids = torch.randint(0, args.vocab, (args.batch, args.prompt + args.tokens), device=dev)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t_train += time.perf_counter() - t3
    if pending is not None:
        pending.join()
    wall = time.perf_counter() - wall0
    return {"schedule": name, "steps": args.steps, "wall_s": wall, "t_gen_s": t_gen,
            "t_train_s": t_train, "t_sandbox_wait_s": t_wait,
            "U": (t_gen + t_train) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latencies", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ops", nargs="+", default=["checkpoint", "rollback"],
                    help="sandbox operations waited for per step (keys of the JSON)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    lat = load_latencies(args.latencies)
    baseline = {op: lat[f"baseline_{op}"] for op in args.ops}
    ours = {op: lat[op] for op in args.ops}
    torch.manual_seed(0)
    model = Policy(args.vocab, args.d, args.layers, args.heads).cuda().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())
    model.generate(torch.randint(0, args.vocab, (args.batch, args.prompt), device="cuda"), 4)
    torch.cuda.synchronize()  # warm-up: kernels, allocator
    rng = random.Random(0)
    results = [run_schedule("baseline", model, opt, args, baseline, rng),
               run_schedule("sequential", model, opt, args, ours, rng),
               run_schedule("overlapped", model, opt, args, ours, rng)]
    print(f"policy: {params / 1e6:.0f}M parameters, batch {args.batch}, "
          f"{args.tokens} tokens per action, {torch.cuda.get_device_name()}")
    print(f"sandbox ops per step: {' + '.join(args.ops)}")
    print(f"{'schedule':12s} {'wall s':>8s} {'T_gen':>8s} {'T_train':>8s} {'waited':>8s} {'U':>6s}")
    for r in results:
        print(f"{r['schedule']:12s} {r['wall_s']:8.2f} {r['t_gen_s']:8.2f} {r['t_train_s']:8.2f}"
              f" {r['t_sandbox_wait_s']:8.2f} {r['U']:6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": params, "device": torch.cuda.get_device_name(),
                       "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
