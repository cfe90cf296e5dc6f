"""`deltabox bench batch`: a batched call (CheckpointMany, RollbackMany, ExecMany) over N
sandboxes vs the same N single calls, made one after another (the blocking client) and all
at once (the asyncio client, `asyncio.gather`).

The three ways take turns within each round on the same N sandboxes of a throw-away daemon
(tiny image), so they share the host's load; the number is the p50, over rounds, of the
wall time for all N items as the client sees it; the order of the three ways rotates
from round to round, and before each way the daemon's background work is let finish. Operations: FS checkpoint (of a sandbox that
changed a file since its last one: an unchanged sandbox's checkpoint is the head again),
exec of `true`, and rollback to a
checkpoint taken (untimed) just before, its standby built (`wait_ready`), so that every
way's rollbacks take the same fast path.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import deltabox
from deltabox.bench.common import CACHE, DaemonView
from deltabox.client.results import ExecResult
from deltabox.errors import DeltaboxError
from deltabox.stats import percentile
from deltabox.testing import ThrowawayDaemon

__all__ = ["main_batch", "run_batch"]

WAYS = ("batch", "sequential", "concurrent")


def _settle(view: DaemonView, timeout: float = 60.0) -> bool:
    """Wait for the daemon's background work (standbys being built after checkpoints and
    rollbacks, old branches retired) to end: its branch mounts steady and its own CPU
    under 10 % for 300 ms. Without this a way pays for the work its predecessor left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mounts, cpu = view.branch_mounts(), view.cpu_ticks()
        time.sleep(0.3)
        if view.branch_mounts() == mounts and view.cpu_ticks() - cpu < 0.03:
            return True
    return False


def _failed(outcome) -> bool:
    """An item that raised, or an exec that did not exit 0."""
    return isinstance(outcome, BaseException) or (
        isinstance(outcome, ExecResult) and not outcome.ok)


def _singles(sandboxes, targets):
    """op -> a blocking single call for sandbox i."""
    return {
        "checkpoint": lambda i: sandboxes[i].checkpoint(),
        "rollback": lambda i: sandboxes[i].rollback(targets[i]),
        "exec": lambda i: sandboxes[i].exec(["true"]),
    }


def _batches(client, sandboxes, targets, concurrency: int):
    return {
        "checkpoint": lambda: client.checkpoint_many(sandboxes, concurrency=concurrency),
        "rollback": lambda: client.rollback_many(list(zip(sandboxes, targets)),
                                                 concurrency=concurrency),
        "exec": lambda: client.exec_many([(s, ["true"]) for s in sandboxes],
                                         concurrency=concurrency),
    }


def _sequential(single, n: int) -> list:
    outcomes = []
    for i in range(n):
        try:
            outcomes.append(single(i))
        except DeltaboxError as e:
            outcomes.append(e)
    return outcomes


async def _concurrent(op: str, boxes: list, targets) -> list:
    """The N single calls at once, from the asyncio client."""
    if op == "checkpoint":
        calls = (b.checkpoint() for b in boxes)
    elif op == "rollback":
        calls = (b.rollback(c) for b, c in zip(boxes, targets))
    else:
        calls = (b.exec(["true"]) for b in boxes)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for o in outcomes:
        if isinstance(o, BaseException) and not isinstance(o, DeltaboxError):
            raise o
    return outcomes


def run_batch(n: int = 64, rounds: int = 10, concurrency: int = 0, progress=print) -> dict:
    rows: dict[str, dict[str, list[float]]] = {op: {w: [] for w in WAYS}
                                                for op in ("checkpoint", "rollback", "exec")}
    failures = {op: {w: 0 for w in WAYS} for op in rows}
    unsettled = 0
    with ThrowawayDaemon() as d, d.client() as client:
        client.import_image("tiny", CACHE / "images" / "tiny.tar")
        sandboxes = [client.create("tiny") for _ in range(n)]
        view = DaemonView(d)
        targets: list = []  # each rollback's checkpoints, ready (the standby fast path)
        singles = _singles(sandboxes, targets)
        batches = _batches(client, sandboxes, targets, concurrency)
        loop = asyncio.new_event_loop()
        aclient, boxes = loop.run_until_complete(_async_handles(d.socket, sandboxes))
        try:
            for rnd in range(rounds):
                order = WAYS[rnd % 3:] + WAYS[:rnd % 3]  # no way always first
                for op in rows:
                    for way in order:
                        if op == "checkpoint":  # untimed: a change, so none is "unchanged"
                            client.exec_many([(s, "date +%s%N > /tmp/tick")
                                              for s in sandboxes]).values()
                        if op == "rollback":  # untimed: fresh targets, their standbys built
                            targets[:] = [i.value.id if i.ok else "" for i in
                                          client.checkpoint_many(sandboxes, wait_ready=True)]
                        unsettled += not _settle(view)
                        t0 = time.perf_counter()
                        if way == "batch":
                            outcomes = [i.error or i.value for i in batches[op]()]
                        elif way == "sequential":
                            outcomes = _sequential(singles[op], n)
                        else:
                            outcomes = loop.run_until_complete(_concurrent(op, boxes, targets))
                        rows[op][way].append(1000 * (time.perf_counter() - t0))
                        bad = [o for o in outcomes if _failed(o)]
                        failures[op][way] += len(bad)
                        if bad:
                            progress(f"{op} {way}: {len(bad)} failed, e.g. {bad[0]!r}")
                progress(f"round {rnd + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})")
        finally:
            loop.run_until_complete(aclient.close())
            loop.close()
            for s in sandboxes:
                try:
                    s.destroy()
                except DeltaboxError as e:
                    progress(f"destroying {s.id}: {e!r}")
    table = []
    for op, ways in rows.items():
        p50 = {w: percentile(v, 50) for w, v in ways.items()}
        table.append({"operation": op, "n": n, "rounds": rounds,
                      **{f"{w}_p50_ms": round(p50[w], 2) for w in WAYS},
                      "sequential_over_batch": round(p50["sequential"] / p50["batch"], 2),
                      "concurrent_over_batch": round(p50["concurrent"] / p50["batch"], 2),
                      "failed_items": failures[op],
                      "samples_ms": {w: [round(x, 1) for x in v] for w, v in ways.items()}})
    return {"rows": table, "concurrency": concurrency or "daemon default",
            "unsettled": unsettled,
            "loadavg": os.getloadavg(), "cpus": os.cpu_count()}


async def _async_handles(socket, sandboxes):
    aclient = deltabox.AsyncClient(socket)
    return aclient, [await aclient.get(s.id) for s in sandboxes]


def main_batch(args) -> int:
    doc = run_batch(args.n, args.rounds or (3 if args.quick else 10), args.concurrency,
                    progress=lambda m: print(m, file=sys.stderr))
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{'operation':<11} {'N':>4} {'batch p50':>10} {'sequential':>11} "
          f"{'concurrent':>11} {'seq/batch':>9} {'conc/batch':>10}   (ms for all N)")
    for r in doc["rows"]:
        print(f"{r['operation']:<11} {r['n']:>4} {r['batch_p50_ms']:>10.1f} "
              f"{r['sequential_p50_ms']:>11.1f} {r['concurrent_p50_ms']:>11.1f} "
              f"{r['sequential_over_batch']:>9.2f} {r['concurrent_over_batch']:>10.2f}"
              + (f"  failed items {r['failed_items']}" if any(r["failed_items"].values())
                 else ""))
    print(f"load average at the end {doc['loadavg'][0]:.2f} on {doc['cpus']} CPUs")
    return 0
