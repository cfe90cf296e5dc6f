"""Tree search over code edits on DeltaBox: checkpoint, try, roll back, fork.

    sudo .venv/bin/python rl_examples/tree_search.py [--socket PATH] [--width 4]

A small repository with two bugs lives in a sandbox. At every level the
"policy" proposes `width` candidate edits (here: a fixed list of plausible
patches, shuffled -- swap in your model); each candidate is tried on its own
fork of the current checkpoint, scored by running the test suite, and the best
child becomes the next level's checkpoint. Meanwhile the parent sandbox keeps a
persistent Python session whose state survives rollbacks (full checkpoints).

What it shows: fork(n) of a checkpoint, rollback, the tree (`deltabox tree`),
diff between checkpoints, and how little time the sandbox side takes compared
with running the tests themselves. Needs a running daemon with the `demo`
image (`deltabox image import demo /var/cache/deltabox/images/demo.tar`).
"""

from __future__ import annotations

import argparse
import random
import time

import deltabox

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
    out = sbx.exec(["sh", "-c", "cd /work/repo && python3 -m unittest 2>&1 | "
                                "grep -cE '^(FAIL|ERROR):' || true"]).stdout
    return int(out.strip() or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--think", type=float, default=0.5,
                    help="seconds the (simulated) model takes to propose edits; the daemon "
                         "warms the fork's body doubles meanwhile")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    timings: dict[str, list[float]] = {"checkpoint": [], "fork": [], "score": [],
                                       "destroy": []}

    def timed(kind, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[kind].append(time.perf_counter() - t0)
        return out

    with deltabox.Client(args.socket) as client, client.create("demo", name="search-root") as root:
        for path, text in REPO.items():
            root.write_file(path, text, make_parents=True)
        notes = root.open_session("python", name="notes")
        notes.run("history = []")
        best = timed("checkpoint", root.checkpoint, "start", full=True)
        level = 0
        while failures(root) and level < 4:
            level += 1
            # Hint first, then "think": the daemon restores the children meanwhile.
            client.warm(best, args.width)
            time.sleep(args.think)
            proposals = rng.sample(CANDIDATES, min(args.width, len(CANDIDATES)))
            children = timed("fork", client.fork, best, len(proposals))
            scored = []
            for (desc, sed), child in zip(proposals, children):
                if child.error:
                    print(f"  child failed: {child.error}")
                    continue
                sbx = child.sandbox
                sbx.exec(["sed", "-i", sed, "/work/repo/calc.py"])
                n = timed("score", failures, sbx)
                scored.append((n, desc, sbx))
                print(f"  level {level}: {desc:28s} -> {n} failing tests")
            n, desc, winner = min(scored, key=lambda s: s[0])
            # Move the parent to the winner's state: the same edit, then a checkpoint.
            root.rollback(best)
            sed = dict(CANDIDATES)[desc]
            root.exec(["sed", "-i", sed, "/work/repo/calc.py"])
            notes.run(f"history.append({desc!r})")
            best = timed("checkpoint", root.checkpoint, desc, full=True)
            for _, _, sbx in scored:
                timed("destroy", sbx.destroy)
            print(f"level {level}: kept {desc!r} ({n} failing)")
        print("history in the persistent session:",
              notes.run("print(history)").stdout.decode().strip())
        print("diff start -> final:", client.diff(root.checkpoints()[0], best))
        print("\nsandbox-side time per operation (through gRPC):")
        for kind, xs in timings.items():
            if xs:
                xs.sort()
                print(f"  {kind:10s} n={len(xs):3d} p50 {1000 * xs[len(xs) // 2]:8.1f} ms")


if __name__ == "__main__":
    main()
