"""Search for the fix of a real bug in a real project, scoring nodes with its own tests.

    sudo .venv/bin/python rl_examples/bug_search.py --out rl_examples/results/bug-search.json
         [--socket PATH] [--modes full,fs,baseline] [--repeats 3] [--budget 80]
         [--width 6] [--seed 1]

The project is more-itertools 10.5.0 from its PyPI sdist (pinned, SHA256-checked), with
two faults injected into `windowed` (rl_examples/bugsearch/project.py says which, and
`python rl_examples/bugsearch/project.py DEST` reproduces it). It goes into a `demo`
sandbox (python3.11) through the file API, beside the test runner
(rl_examples/bugsearch/runner.py).

The search, the same in every mode:
  root      the whole suite runs once (817 tests + doctests); its failing test classes
            and doctests become the node score's selection, and the policy ranks the
            functions they name (rl_examples/bugsearch/policy.py); the root is checkpointed.
  best-first  pop the node with the lowest failures + 2 x its depth (then the oldest);
            take its next --width untried edits in the policy's order (an edit whose
            result was already seen anywhere is skipped); for each: roll the sandbox
            back to the node unless it is there (a rollback to an ancestor or across
            the tree), apply the edit and run the selection IN THE SANDBOX (the runner
            first checks that the file -- and, in full mode, the session -- is the
            node's: a broken rollback stops the search); a child no worse than its
            parent is checkpointed and joins the frontier; a child that passes the
            selection is run against the whole suite and, passing, ends the search. The
            node goes back to the frontier while it has untried edits.
Modes (rl_examples/bugsearch/backends.py): `full` (DeltaBox full checkpoints: the
Python session that keeps the project imported is rolled back with the files),
`fs` (DeltaBox fs checkpoints; a fresh interpreter per node) and `baseline` (plain
CRIU dump/restore + a copy of the project tree, with the same session). Within a
repeat every mode uses the same policy seed, so they expand the same tree and the
nodes per minute compare only the cost of keeping states; repeats change the seed,
and the modes run in a random order per repeat.

A *node* is one evaluated edit: [rollback] + edit and tests + [checkpoint]. Nodes per
minute = nodes / the search's wall clock (from the root's checkpoint to the fix; left
out: the final whole-suite run, the same in every mode, and the baseline's measurement
artefacts -- killing the restored copy, mirroring /work into the live sandbox). Per-node and per-operation p50/p95 from deltabox.stats.
Without --socket a throw-away daemon is started (deltabox.testing) with the demo image.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bugsearch import policy, project  # noqa: E402
from bugsearch.backends import MODES, RUNNER, WORKSPACE, make_backend  # noqa: E402

import deltabox  # noqa: E402
from deltabox.host.criu import find_criu  # noqa: E402
from deltabox.stats import summary  # noqa: E402

DEMO_TAR = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox")) / "images" / "demo.tar"
BROKEN = 10**6   # the score of an edit that does not even import
RUNNER_SOURCE = Path(__file__).resolve().parent / "bugsearch" / "runner.py"


@dataclass
class Node:
    id: int
    parent: "Node | None"
    text: str
    sha: str
    failures: int
    depth: int
    edit: "policy.Edit | None" = None
    handle: object = None                 # the backend's checkpoint
    untried: list | None = None           # the policy's edits not yet expanded
    children: list = field(default_factory=list)

    def ancestors(self):
        n = self.parent
        while n is not None:
            yield n
            n = n.parent


class Search:
    """One best-first search in one mode; `stats` is what it measured."""

    def __init__(self, backend, root_text: str, upstream: str, seed: int, width: int,
                 budget: int):
        self.b, self.seed, self.width, self.budget = backend, seed, width, budget
        self.upstream = upstream          # the fixed file, to say if the fix is upstream's
        self.depth_cost = 2.0
        self.root_text = root_text
        self.ms: dict[str, list[float]] = {k: [] for k in ("node", "rollback", "step",
                                                          "checkpoint", "verify")}
        self.paths: Counter = Counter()
        self.moves: Counter = Counter()   # where rollbacks went: parent/ancestor/other
        self.nodes: list[Node] = []
        self.seen: set[str] = set()

    def request(self, call: str, **kw) -> dict:
        req = {"call": call, "root": WORKSPACE, "file": project.FAULTY_FILE,
               **kw}
        res = self.b.call(req)
        if "error" in res:
            raise RuntimeError(f"{self.b.mode}: {res['error']}")
        return res

    def timed(self, kind: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.ms[kind].append(1000 * (time.perf_counter() - t0))
        return out

    def run(self) -> dict:
        whole = self.request("full_suite")
        self.selection = whole["failed"]
        self.suspects = policy.suspects(self.selection, self.root_text)
        if self.b.checks_session:
            self.request("set_node", node=0)
        root = Node(0, None, self.root_text, whole["sha"], whole["failures"], 0)
        root.handle = self.b.checkpoint("node-0")
        self.nodes.append(root)
        self.seen.add(root.sha)
        frontier = [(self.priority(root), 0)]
        at: Node | None = root          # the node the sandbox is at (None: a discarded child)
        below: Node = root              # the parent of the state the sandbox is in
        found = None
        excluded0 = self.b.excluded_ms
        t_start = time.perf_counter()
        while frontier and found is None and len(self.nodes) - 1 < self.budget:
            node = self.nodes[heapq.heappop(frontier)[1]]
            if node.untried is None:
                node.untried = policy.candidates(node.text, self.suspects, self.seed)
            batch = []
            while node.untried and len(batch) < self.width:
                edit = node.untried.pop(0)
                if project_sha(edit.apply(node.text)) not in self.seen:
                    batch.append(edit)
            for edit in batch:
                if len(self.nodes) - 1 >= self.budget:
                    break
                t0 = time.perf_counter()
                if at is not node:
                    self.moves[self.move_kind(below, node)] += 1
                    self.paths[self.timed("rollback", self.b.rollback, node.handle)] += 1
                child, passed = self.expand(node, edit)
                at, below = None, node
                if passed:
                    whole = self.timed("verify", self.request, "full_suite")
                    found = child if whole["failures"] == 0 else None
                if found is not None or child.failures <= node.failures:
                    child.handle = self.timed("checkpoint", self.b.checkpoint,
                                              f"node-{child.id}")
                    at = child
                    if found is None:
                        heapq.heappush(frontier, (self.priority(child), child.id))
                self.ms["node"].append(1000 * (time.perf_counter() - t0))
                if found is not None:
                    break
            if node.untried:
                heapq.heappush(frontier, (self.priority(node), node.id))
        # The whole suite at the fix is the same work in every mode and not an expansion;
        # the baseline's measurement artefacts are not the user's.
        wall_ms = (1000 * (time.perf_counter() - t_start) - sum(self.ms["verify"])
                   - (self.b.excluded_ms - excluded0))
        end_check = self.check_a_rollback(root)
        return self.report(found, wall_ms, whole, end_check)

    def expand(self, node: Node, edit) -> tuple[Node, bool]:
        """One child of `node` (where the sandbox is): the edit applied and the
        selection run in the sandbox. Returns it, and whether it passed the selection."""
        res = self.timed("step", self.request, "step", expect_sha=node.sha,
                         expect_node=node.id, check_session=self.b.checks_session,
                         node=len(self.nodes), edit=[edit.lineno, edit.old, edit.new],
                         selection=self.selection)
        text = edit.apply(node.text)
        if res["sha"] != project_sha(text):
            raise RuntimeError(f"{self.b.mode}: the sandbox's file after the edit is not "
                               "the one the policy made")
        failures = res.get("failures", BROKEN)
        child = Node(len(self.nodes), node, text, res["sha"], failures, node.depth + 1, edit)
        node.children.append(child)
        self.nodes.append(child)
        self.seen.add(child.sha)
        return child, failures == 0

    def priority(self, node: Node) -> float:
        """Best-first order: failures plus a cost per edit (fewer edits, same failures:
        first), then the oldest."""
        return node.failures + self.depth_cost * node.depth

    def move_kind(self, below: Node, target: Node) -> str:
        if target is below:
            return "to the parent (next sibling)"
        if target in below.ancestors():
            return "to an older ancestor"
        return "to another branch"

    def check_a_rollback(self, root: Node) -> dict:
        """After the search: back to the oldest kept node below the root, and compare
        what the sandbox holds with what that node recorded (untimed)."""
        kept = [n for n in self.nodes[1:] if n.handle is not None]
        target = kept[0] if kept else root
        self.b.rollback(target.handle)
        data = self.b.read_file(f"{WORKSPACE}/{project.FAULTY_FILE}")
        out = {"node": target.id, "file_matches": project_sha(data.decode()) == target.sha}
        if self.b.checks_session:
            session = self.b.session.run("print(R.HERE['node'])").stdout.decode().strip()
            out["session_node"] = int(session)
            out["session_matches"] = int(session) == target.id
        return out

    def report(self, found: Node | None, wall_ms: float, whole: dict, end_check) -> dict:
        n = len(self.nodes) - 1
        kept = {n_.id: n_.handle for n_ in self.nodes if n_.handle is not None}
        parents = self.b.checkpoint_tree(kept)
        fanout = Counter(p for p in parents.values() if p)
        path = []
        node = found
        while node is not None and node.edit is not None:
            path.append(node.edit.what)
            node = node.parent
        return {
            "mode": self.b.mode, "seed": self.seed, "found": found is not None,
            "nodes": n, "wall_s": round(wall_ms / 1000, 3),
            "nodes_per_min": round(60_000 * n / wall_ms, 1) if wall_ms > 0 else None,
            "fix": path[::-1], "fix_depth": found.depth if found else None,
            "fix_is_upstream": bool(found and found.text == self.upstream),
            "whole_suite_at_fix": {k: whole[k] for k in ("ran", "failures")} if found else None,
            "root_failures": self.nodes[0].failures, "selection": self.selection,
            "suspects": self.suspects,
            "checkpoints": len(kept), "checkpoints_with_2_children": sum(
                1 for c in fanout.values() if c >= 2),
            "rollbacks": sum(self.paths.values()), "rollback_moves": dict(self.moves),
            "rollback_paths": dict(self.paths),
            "ms": {k: summary(v, 1) for k, v in self.ms.items() if v},
            "samples_ms": {k: [round(x, 2) for x in v] for k, v in self.ms.items()},
            "ms_total": {k: round(sum(v), 1) for k, v in self.ms.items()},
            "excluded_ms": round(self.b.excluded_ms, 1),
            "end_check": end_check,
            "tree": [[n_.id, n_.parent.id if n_.parent else None, n_.failures,
                      n_.handle is not None, n_.edit.what if n_.edit else "root"]
                     for n_ in self.nodes],
        }


def project_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run_mode(client, mode: str, files: dict[str, bytes], upstream: str, args,
             seed: int, scratch: Path, criu) -> dict:
    sbx = client.create(args.image, name=f"bugsearch-{mode}-{seed}", memory=1 << 30)
    backend = None
    try:
        sbx.write_file(RUNNER, RUNNER_SOURCE.read_bytes(), make_parents=True)
        for rel, data in files.items():
            sbx.write_file(f"{WORKSPACE}/{rel}", data, make_parents=True)
        backend = make_backend(mode, client, sbx, scratch, criu)
        search = Search(backend, files[project.FAULTY_FILE].decode(), upstream, seed,
                        args.width, args.budget)
        return search.run()
    finally:
        if backend is not None:
            backend.close()
        else:
            sbx.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", help="a running daemon (default: start a throw-away one)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=int, default=80, help="most nodes per search")
    ap.add_argument("--width", type=int, default=6, help="edits tried per expansion")
    ap.add_argument("--seed", type=int, default=1, help="the first repeat's policy seed")
    ap.add_argument("--sdist", help="the pinned sdist, where pip cannot download it")
    ap.add_argument("--image", default="demo", help="an image with python3 (>= 3.9)")
    ap.add_argument("--image-tar", default=str(DEMO_TAR),
                    help="what the throw-away daemon imports as --image")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # A SIGTERM unwinds (the finally blocks destroy the sandboxes and the daemon).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modes = args.modes.split(",")
    sdist = project.sdist_path(args.sdist)
    files, upstream = project.project_files(sdist), project.upstream_text(sdist)
    criu = find_criu()
    daemon = None
    if args.socket is None:
        from deltabox.testing import ThrowawayDaemon
        daemon = ThrowawayDaemon().start(timeout=60)
        args.socket = str(daemon.socket)
    doc = {"command": " ".join(sys.argv), "image": args.image,
           "project": f"{project.PROJECT} {project.VERSION}",
           "faults": project.FAULTS, "budget": args.budget, "width": args.width,
           "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
           "runs": []}
    try:
        with deltabox.Client(args.socket) as client:
            if daemon is not None:
                client.import_image(args.image, args.image_tar)
            scratch = Path(client.status().state_dir) / "store" / "tmp"
            for r in range(args.repeats):
                seed = args.seed + r
                order = random.Random(seed).sample(modes, len(modes))
                for mode in order:
                    res = run_mode(client, mode, files, upstream, args, seed, scratch, criu)
                    res["repeat"] = r
                    doc["runs"].append(res)
                    print(f"repeat {r} seed {seed} {mode:8s}: found={res['found']} "
                          f"nodes={res['nodes']} wall={res['wall_s']:.1f}s "
                          f"nodes/min={res['nodes_per_min']} fix={res['fix']} "
                          f"paths={res['rollback_paths']}", flush=True)
    finally:
        if daemon is not None:
            daemon.cleanup()
    doc["machine"]["loadavg_after"] = os.getloadavg()
    doc["summary"] = summarise(doc["runs"], modes)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print_table(doc["summary"])


def summarise(runs: list[dict], modes: list[str]) -> dict:
    out = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        out[mode] = {
            "runs": len(rs), "found": sum(r["found"] for r in rs),
            "nodes": sum(r["nodes"] for r in rs),
            "nodes_per_min": summary([r["nodes_per_min"] for r in rs], 1),
            "nodes_per_min_pooled": round(60 * sum(r["nodes"] for r in rs) /
                                          sum(r["wall_s"] for r in rs), 1),
            # what keeping states costs a node on average: its rollbacks + checkpoints
            "state_ms_per_node": round(sum(r["ms_total"]["rollback"] +
                                           r["ms_total"]["checkpoint"] for r in rs) /
                                       max(1, sum(r["nodes"] for r in rs)), 1),
            **{f"{k}_ms": summary(v, 1) for k in ("node", "rollback", "step", "checkpoint")
               if (v := [x for r in rs for x in r["samples_ms"].get(k, [])])},
        }
    return out


def print_table(summ: dict) -> None:
    print(f"\n{'mode':9s} {'found':>6s} {'nodes':>6s} {'nodes/min':>10s} "
          f"{'node p50':>9s} {'node p95':>9s} {'rollback p50':>13s} {'ckpt p50':>9s}")
    for mode, s in summ.items():
        print(f"{mode:9s} {s['found']:>3d}/{s['runs']:<2d} {s['nodes']:6d} "
              f"{s['nodes_per_min_pooled']:10.1f} {s['node_ms']['p50']:9.1f} "
              f"{s['node_ms']['p95']:9.1f} "
              f"{s.get('rollback_ms', {}).get('p50', float('nan')):13.1f} "
              f"{s.get('checkpoint_ms', {}).get('p50', float('nan')):9.1f}")


if __name__ == "__main__":
    main()
