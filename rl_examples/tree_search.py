"""Tree search over code edits on DeltaBox: checkpoint, fork, score, roll back to the best.

    sudo .venv/bin/python rl_examples/tree_search.py [--socket PATH] [--width 4] [--cold]

A small repository with two bugs lives in a sandbox (the "root"), beside a persistent
Python session `notes` that keeps the search's history. At every level:
  1. the root's state is a full checkpoint (files + processes, the session included);
  2. `Warm(checkpoint, width)` is sent as a hint (it returns at once) and the root runs
     the test suite -- real work the body doubles are built behind; with --cold no
     hint is sent (the last level's hint is not used: its tests pass; the daemon keeps
     that pool until its warm memory budget evicts it);
  3. the "policy" proposes `width` candidate edits (a fixed list of plausible patches,
     shuffled -- swap in your model); `Fork(checkpoint, width)` makes one child per
     candidate: it adopts the warm incarnations ready by then and restores the rest
     cold (the warm-up's own work ran beside the root's tests, in their wall time);
  4. each child applies its edit, appends it to its copy of the `notes` history, and is
     scored by running the tests;
  5. the best child is checkpointed and the root is ROLLED BACK to that child's
     checkpoint: files and the session's history come back from the child; the
     children are destroyed.

Every time printed is the client's wall clock around the call. What it shows: warm,
fork(n) of a checkpoint, rollback across the tree, the diff between checkpoints, and
how the sandbox side compares with running the tests themselves. Needs a running
daemon with the `demo` image (`deltabox image import demo /var/cache/deltabox/images/demo.tar`).
"""

from __future__ import annotations

import argparse
import random
import time

import deltabox
from deltabox.stats import summary

REPO = {
    "/work/repo/calc.py": (
        "def mean(xs):\n"
        "    return sum(xs) / (len(xs) - 1)\n\n"
        "def clamp(x, lo, hi):\n"
        "    return max(lo, min(x, lo))\n"),
    "/work/repo/test_calc.py": (
        "import unittest\nfrom calc import mean, clamp\n\n"
        "class T(unittest.TestCase):\n"
        "    def test_mean(self):\n        self.assertEqual(mean([1, 2, 3]), 2)\n"
        "    def test_mean_one(self):\n        self.assertEqual(mean([4]), 4)\n"
        "    def test_clamp_mid(self):\n        self.assertEqual(clamp(5, 0, 10), 5)\n"
        "    def test_clamp_hi(self):\n        self.assertEqual(clamp(50, 0, 10), 10)\n"),
}

# Candidate edits a model might propose: (description, sed expression on calc.py)
CANDIDATES = [
    ("mean: divide by len", r"s/(len(xs) - 1)/len(xs)/"),
    ("mean: divide by len+1", r"s/(len(xs) - 1)/(len(xs) + 1)/"),
    ("mean: use max", r"s/sum(xs)/max(xs)/"),
    ("clamp: min with hi", r"s/min(x, lo)/min(x, hi)/"),
    ("clamp: swap max/min", r"s/max(lo, min(x, lo))/min(lo, max(x, lo))/"),
    ("clamp: return x", r"s/return max(lo, min(x, lo))/return x/"),
]

def failures(sbx) -> int:
    # -B: no __pycache__. A .pyc is trusted while its source keeps the same size and
    # mtime in whole seconds, so a same-length edit (min(x, lo) -> min(x, hi)) made
    # within a second of the parent's test run would be scored with the parent's code.
    out = sbx.exec(["sh", "-c", "cd /work/repo && python3 -B -m unittest 2>&1 | "
                                "grep -cE '^(FAIL|ERROR):' || true"]).stdout
    return int(out.strip() or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="no Warm hint before each fork")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    timings: dict[str, list[float]] = {op: [] for op in (
        "checkpoint", "warm hint", "fork", "rollback", "destroy", "score (tests)")}

    def timed(kind, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[kind].append(1000 * (time.perf_counter() - t0))
        return out

    t_start = time.perf_counter()
    with deltabox.Client(args.socket) as client, client.create("demo", name="search-root") as root:
        for path, text in REPO.items():
            root.write_file(path, text, make_parents=True)
        notes = root.open_session("python", name="notes")
        notes.run("history = []")
        start = best = timed("checkpoint", root.checkpoint, "start", full=True)
        level = 0
        while True:
            if not args.cold:  # a hint: the doubles are built while the root's tests run
                timed("warm hint", client.warm, best, args.width)
            if not timed("score (tests)", failures, root) or level == 4:
                break
            level += 1
            proposals = rng.sample(CANDIDATES, min(args.width, len(CANDIDATES)))
            children = timed("fork", client.fork, best, len(proposals))
            scored = []
            for (desc, sed), child in zip(proposals, children):
                if child.error:
                    print(f"  child failed: {child.error}")
                    continue
                sbx = child.sandbox
                sbx.exec(["sed", "-i", sed, "/work/repo/calc.py"])
                sbx.session("notes").run(f"history.append({desc!r})")
                n = timed("score (tests)", failures, sbx)
                scored.append((n, desc, sbx))
                print(f"  level {level}: {desc:28s} -> {n} failing tests")
            n, desc, winner = min(scored, key=lambda s: s[0])
            # The root becomes the winner: its checkpoint, rolled back to across the tree.
            best = timed("checkpoint", winner.checkpoint, desc, full=True)
            res = timed("rollback", root.rollback, best)
            for _, _, sbx in scored:
                timed("destroy", sbx.destroy)
            print(f"level {level}: root rolled back to the best child {best.id} "
                  f"({desc!r}, {n} failing; rollback path {res.path})")
        print("history in the root's session:",
              notes.run("print(history)").stdout.decode().strip())
        changes = [f"{e.change} {e.path}" for e in client.diff(start, best)
                   if e.path.startswith("/work/")]
        print("diff start -> final, under /work:", ", ".join(changes))
    wall = 1000 * (time.perf_counter() - t_start)
    print(f"\nclient-side time per operation, ms (whole run {wall:.0f} ms):")
    for kind, xs in timings.items():
        if xs:
            s = summary(xs, 1)
            print(f"  {kind:14s} n={s['n']:3d} p50 {s['p50']:8.1f} p95 {s['p95']:8.1f} "
                  f"total {sum(xs):8.1f}")


if __name__ == "__main__":
    main()
