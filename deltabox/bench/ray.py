"""`deltabox bench ray`: deltabox.ray's cost over the plain client, and sandboxes at scale
over the nodes of a Ray cluster.

1. Per-call overhead: `exec(["true"])` on one sandbox of the driver's node, four ways in
   turn within each iteration (same load for all): the plain `Client` on the daemon's unix
   socket (the baseline), the plain `Client` over TCP + TLS + token (what the pool's
   handles use underneath), a pool handle (`PoolSandbox.exec`: routing + the cached TCP
   connection), and an actor hop (a Ray actor on the node that holds a unix-socket client
   and execs for the caller: the design the handles avoid). p50 / p95 of each.
2. Scale: N sandboxes placed by free slots over the nodes; with `--concurrency` threads,
   each sandbox is created, stepped (an exec that changes a file), checkpointed (FS) and
   rolled back, one call each: p50 / p99 of each call as the caller sees it, and the
   wall time for all N. Then the same step / checkpoint / rollback as one batched pool
   call each (`exec_many`, `checkpoint_many`, `rollback_many`: one RPC per node,
   concurrently): its wall time.

Without `--address` it runs on a local cluster (`deltabox.ray.local.LocalCluster`:
`--nodes` Ray nodes on this machine, a daemon each); with it, on a running cluster whose
NodeDaemons are up. Export/import numbers are `deltabox bench transfer`'s.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import deltabox
from deltabox.bench.common import CACHE
from deltabox.stats import percentile

__all__ = ["main_ray"]

WAYS = ("client (unix socket)", "client (TCP+TLS+token)", "pool handle", "actor hop")


def _ms(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, 1000 * (time.perf_counter() - t0)


def _row(name: str, samples: list[float], hi: float = 95) -> dict:
    return {"name": name, "n": len(samples), "p50_ms": round(percentile(samples, 50), 3),
            f"p{hi:g}_ms": round(percentile(samples, hi), 3)}


class _HopBody:
    """The actor of the hop: a unix-socket client on the sandbox's node, exec for callers."""

    def __init__(self, socket: str, info):
        self.sbx = deltabox.Sandbox(deltabox.Client(socket), info)

    def exec(self, argv: list[str]) -> int:
        return self.sbx.exec(argv).exit_code


def overhead(pool, iterations: int, log) -> list[dict]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from deltabox.ray import routing
    head = ray.get_runtime_context().get_node_id()
    node = head if head in pool.node_ids else pool.node_ids[0]
    sbx = pool.create("tiny", 1, node=node)[0]
    ep = routing.endpoint_of(node)
    socket = f"{ep.state_dir}/deltabox.sock"
    unix = deltabox.Client(socket)
    tcp = routing.client_for_endpoint(ep)
    hop = ray.remote(num_cpus=0)(_HopBody).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        socket, sbx.info)
    argv = ["true"]
    calls = {
        WAYS[0]: lambda: deltabox.Sandbox(unix, sbx.info).exec(argv),
        WAYS[1]: lambda: deltabox.Sandbox(tcp, sbx.info).exec(argv),
        WAYS[2]: lambda: sbx.exec(argv),
        WAYS[3]: lambda: ray.get(hop.exec.remote(argv)),
    }
    for call in calls.values():   # warm: connections, the actor
        for _ in range(5):
            call()
    samples = {w: [] for w in WAYS}
    for i in range(iterations):
        order = WAYS[i % 4:] + WAYS[:i % 4]
        for way in order:
            samples[way].append(_ms(calls[way])[1])
    log(f"overhead: {iterations} iterations of each way")
    ray.kill(hop)
    unix.close()
    tcp.close()
    sbx.destroy()
    base = percentile(samples[WAYS[0]], 50)
    rows = [_row(w, samples[w]) for w in WAYS]
    for r in rows:
        r["over_baseline_p50_ms"] = round(r["p50_ms"] - base, 3) + 0.0  # no "-0.0"
    return rows


def forks(pool, iterations: int, log) -> list[dict]:
    """fork(ckpt, 1) on the checkpoint's node vs on another node (sent there first), FS and
    full (a sandbox whose shell holds a variable), each iteration a new checkpoint."""
    if len(pool.node_ids) < 2:
        return []
    src, dst = pool.node_ids[0], pool.node_ids[1]
    sbx = pool.create("tiny", 1, node=src)[0]
    sbx.exec("sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &")
    samples: dict[str, list[float]] = {}
    try:
        for i in range(iterations):
            sbx.write_file("/tmp/i", str(i))
            for full in (False, True):
                ckpt = sbx.checkpoint(f"bench-{i}", full=full, wait_ready=full)
                mode = "full" if full else "fs"
                for where, node in (("same node", None), ("other node", dst)):
                    res, ms = _ms(lambda: pool.fork(ckpt, 1, node=node))
                    samples.setdefault(f"fork {mode}, {where}", []).append(ms)
                    for child in res:
                        child.sandbox.destroy()
    finally:
        sbx.destroy()
    log(f"forks: {iterations} iterations")
    return [_row(name, ms) for name, ms in samples.items()]


def scale(pool, n: int, concurrency: int, log) -> dict:
    placed = pool.place(n)
    per_node = {node: placed.count(node) for node in set(placed)}
    log(f"scale: {n} sandboxes over {len(per_node)} nodes {sorted(per_node.values())}")
    rows, walls = [], {}

    def phase(name, fn, items):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            results = list(ex.map(lambda it: _ms(lambda: fn(it)), items))
        walls[name] = round(time.perf_counter() - t0, 3)
        rows.append(_row(name, [ms for _, ms in results], 99))
        log(f"  {name}: {walls[name]} s")
        return [out for out, _ in results]

    sbxs = [s for group in phase("create", lambda node: pool.create("tiny", 1, node=node),
                                 placed) for s in group]
    try:
        phase("step (exec)", lambda s: s.exec("echo step >> /tmp/steps"), sbxs)
        ckpts = phase("checkpoint (fs)", lambda s: s.checkpoint(), sbxs)
        # untimed: a change for the rollbacks to undo
        pool.exec_many([(s, "echo after >> /tmp/steps") for s in sbxs]).values()
        backs = phase("rollback", lambda pair: pair[0].rollback(pair[1]), list(zip(sbxs, ckpts)))
        paths = {"rollback": dict(Counter(str(b.path) for b in backs))}
        batched = {}
        for name, call in (
                ("exec_many", lambda: pool.exec_many([(s, "echo b >> /tmp/steps")
                                                      for s in sbxs])),
                ("checkpoint_many", lambda: pool.checkpoint_many(sbxs)),
                ("rollback_many", lambda: pool.rollback_many(list(zip(sbxs, ckpts))))):
            res, ms = _ms(call)
            values = res.values()
            batched[name] = round(ms / 1000, 3)
            if name == "rollback_many":
                paths[name] = dict(Counter(str(v.path) for v in values))
            log(f"  {name}: {batched[name]} s")
    finally:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(lambda s: s.destroy(), sbxs))
        walls["destroy"] = round(time.perf_counter() - t0, 3)
    return {"sandboxes": n, "per_node": sorted(per_node.values()), "concurrency": concurrency,
            "rows": rows, "wall_s": walls, "batched_wall_s": batched, "rollback_paths": paths}


def render(doc: dict) -> None:
    out = sys.stdout
    out.write(f"deltabox bench ray: {doc['nodes']} nodes, {doc['cpus']} host CPUs "
              f"({doc['where']})\n\nPer-call overhead, exec(['true']) "
              f"({doc['iterations']} each, interleaved):\n")
    out.write(f"  {'way':26} {'p50 ms':>8} {'p95 ms':>8} {'+p50 vs unix':>13}\n")
    for r in doc["overhead"]:
        out.write(f"  {r['name']:26} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} "
                  f"{r['over_baseline_p50_ms']:13.2f}\n")
    if doc["forks"]:
        out.write("\nFork of one child, each time from a new checkpoint (other node: sent first):\n")
        out.write(f"  {'fork':26} {'p50 ms':>8} {'p95 ms':>8}\n")
        for r in doc["forks"]:
            out.write(f"  {r['name']:26} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f}\n")
    s = doc["scale"]
    out.write(f"\n{s['sandboxes']} sandboxes (per node {s['per_node']}), "
              f"{s['concurrency']} calls in flight:\n")
    out.write(f"  {'call':18} {'p50 ms':>8} {'p99 ms':>8} {'all N, s':>9}\n")
    for r in s["rows"]:
        out.write(f"  {r['name']:18} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                  f"{s['wall_s'][r['name']]:9.2f}\n")
    for name, wall in s["batched_wall_s"].items():
        out.write(f"  {name:18} {'':8} {'':8} {wall:9.2f}   (one batched pool call)\n")
    out.write(f"  {'destroy (all N)':18} {'':8} {'':8} {s['wall_s']['destroy']:9.2f}\n")
    for name, mix in s["rollback_paths"].items():
        out.write(f"  {name} paths: {mix}\n")
    out.write(f"\nelapsed {doc['elapsed_s']} s\n")


def main_ray(args) -> int:
    import os
    import ray
    quick = bool(getattr(args, "quick", False))
    n = args.sandboxes or (32 if quick else 256)
    iterations = args.iterations or (50 if quick else 300)
    json_out = bool(getattr(args, "json", False))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # The pool's own log lines (structlog) go to stderr too, warnings only: stdout is the
    # table or the JSON document.
    from deltabox.logs import configure_logging
    configure_logging("warning", json=False)

    started = time.time()
    local = None
    if args.address:
        ray.init(address=args.address)
        from deltabox.ray.pool import SandboxPool
        pool = SandboxPool.connect()
        where = f"cluster at {args.address}"
    else:
        from deltabox.ray.local import LocalCluster
        per_node = -(-n // args.nodes) + 1
        log(f"starting a local Ray cluster of {args.nodes} nodes, a daemon each")
        local = LocalCluster(args.nodes, slots=per_node, cpus=os.cpu_count(),
                             images={"tiny": CACHE / "images" / "tiny.tar"},
                             store_size="32G").__enter__()
        pool = local.pool
        where = "local cluster on one machine"
    try:
        doc = {"nodes": len(pool.node_ids), "cpus": os.cpu_count(), "where": where,
               "iterations": iterations,
               "overhead": overhead(pool, iterations, log),
               "forks": forks(pool, args.fork_iterations or (5 if quick else 20), log),
               "scale": scale(pool, n, args.concurrency, log)}
    finally:
        if local is not None:
            local.stop()
    doc["elapsed_s"] = round(time.time() - started, 1)
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        render(doc)
    return 0
