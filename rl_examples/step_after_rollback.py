"""How fast a restored session runs: the bug-search step right after a full rollback.

    sudo .venv/bin/python rl_examples/step_after_rollback.py [--rounds 10] [--steps 5]

One demo sandbox whose persistent Python session has the bug-search project imported
(rl_examples/bug_search.py, its runner and the pinned more-itertools sdist) runs the same
node step (a no-op edit, re-import, the `windowed` tests) again and again. Per round:
a full checkpoint with its body double ready, one step with nothing being built (the
baseline, same run), a rollback to it (path `double`), `--steps` steps at once -- while
the daemon builds the replacement doubles in the background -- and, after a new full
checkpoint (its double being built), `--steps` more.

A/B in one run (issues 10/11): rounds alternate between the daemon as it is (a double's
cgroup weighs like nice BACKGROUND_NICE while it is built: docs/deltacr.md, "After a
restore: running at full speed") and the behaviour before, emulated by a watcher thread
that gives every building double's cgroup the default weight at once (cgroup v1, every
2 ms). Prints the step's p50/p95 -- timed in the session and by the client -- per case.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bugsearch import project  # noqa: E402
from bugsearch.backends import RUNNER, RUNNER_DIR, WORKSPACE  # noqa: E402

from deltabox.bench.common import CACHE  # noqa: E402
from deltabox.host.cgroups import BACKGROUND_NICE, NICE_TO_WEIGHT  # noqa: E402
from deltabox.testing import ThrowawayDaemon  # noqa: E402

RUNNER_SOURCE = Path(__file__).resolve().parent / "bugsearch" / "runner.py"


def request(files: dict[str, bytes]) -> dict:
    """A step that edits line 1 into itself: the file, its SHA and the session's node stay."""
    text = files[project.FAULTY_FILE]
    line1 = text.decode().splitlines(True)[0]
    return dict(root=WORKSPACE, file=project.FAULTY_FILE, node=0, expect_node=0,
                expect_sha=hashlib.sha256(text).hexdigest(), edit=[1, line1, line1],
                selection=["tests.test_more.WindowedTests",
                           "tests.test_more.WindowedCompleteTests"])


def step(py, req: dict) -> tuple[float, float]:
    """(ms in the session, ms at the client) of one node step."""
    t0 = time.perf_counter()
    r = py.run(f"t = time.perf_counter(); r = R.step({req!r}); "
               "print(json.dumps([(time.perf_counter() - t) * 1000, r]))")
    client_ms = 1000 * (time.perf_counter() - t0)
    ms, res = json.loads(r.stdout.decode().strip().splitlines()[-1])
    if "error" in res or "broken" in res:
        raise RuntimeError(f"the step failed: {res}")
    return ms, client_ms


class OldWeights:
    """While `on`: every cgroup of the daemon's instance at the default CPU weight."""

    def __init__(self, instance: str) -> None:
        self.base = Path(f"/sys/fs/cgroup/cpu/deltabox/{instance}")
        self.on, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        background = str(NICE_TO_WEIGHT[BACKGROUND_NICE + 20])
        while not self._stop.is_set():
            if self.on.is_set() and self.base.is_dir():
                for g in self.base.iterdir():
                    try:
                        if (g / "cpu.shares").read_text().strip() == background:
                            (g / "cpu.shares").write_text("1024")
                    except OSError:
                        pass  # a cgroup removed meanwhile
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(rounds: int, steps: int) -> dict[str, list[tuple[float, float]]]:
    if not Path("/sys/fs/cgroup/cpu").is_dir():
        raise SystemExit("the A/B emulates the old weights on cgroup v1 only")
    files = project.project_files(project.sdist_path())
    req = request(files)
    out: dict[str, list] = {k: [] for k in ("idle", "rollback old", "rollback new",
                                            "checkpoint old", "checkpoint new")}
    daemon = ThrowawayDaemon(image_dirs=(CACHE / "images",),
                             extra_args=("--double-policy", "always"))
    old = None
    try:
        daemon.start()
        old = OldWeights(daemon.instance)
        with daemon.client() as client:
            client.import_image("demo", CACHE / "images" / "demo.tar")
            sbx = client.create("demo", name="step-after-rollback", memory=1 << 30)
            sbx.write_file(RUNNER, RUNNER_SOURCE.read_bytes(), make_parents=True)
            for rel, data in files.items():
                sbx.write_file(f"{WORKSPACE}/{rel}", data, make_parents=True)
            py = sbx.open_session("python", name="search")
            r = py.run(f"import json, sys, time; sys.path.insert(0, {RUNNER_DIR!r}); "
                       "import bugsearch_runner as R; ballast = [str(i) for i in range(1500000)]")
            if r.exit_code != 0:
                raise RuntimeError(r.stderr.decode()[-500:])
            for _ in range(3):
                step(py, req)
            for n in range(rounds):
                for mode in (("old", "new") if n % 2 else ("new", "old")):
                    ckpt = sbx.checkpoint(f"{n}-{mode}", full=True, wait_ready=True)
                    time.sleep(0.5)
                    out["idle"].append(step(py, req))
                    (old.on.set if mode == "old" else old.on.clear)()
                    if sbx.rollback(ckpt).path != "double":
                        raise RuntimeError("the rollback did not take the double path")
                    out[f"rollback {mode}"] += [step(py, req) for _ in range(steps)]
                    while not all(c.ready for c in sbx.checkpoints()
                                  if c.label == f"{n}-{mode}"):
                        time.sleep(0.05)
                    time.sleep(0.5)
                    sbx.checkpoint(f"{n}-{mode}-next", full=True)
                    out[f"checkpoint {mode}"] += [step(py, req) for _ in range(steps)]
                    old.on.clear()
            sbx.destroy()
    finally:
        if old is not None:
            old.stop()
        daemon.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="steps timed after each event")
    args = ap.parse_args()
    out = run(args.rounds, args.steps)

    def q(xs: list[float]) -> str:
        xs = sorted(xs)
        return f"{statistics.median(xs):6.1f} / {xs[int(0.95 * (len(xs) - 1))]:6.1f}"
    labels = {"idle": "nothing being built (baseline)",
              "rollback old": "after a rollback, before (default weight)",
              "rollback new": "after a rollback, now (nice-10 weight)",
              "checkpoint old": "after a full checkpoint, before",
              "checkpoint new": "after a full checkpoint, now"}
    print(f"{'step p50 / p95 ms':44s} {'n':>4s} {'in session':>16s} {'client':>16s}")
    for key, label in labels.items():
        rows = out[key]
        print(f"{label:44s} {len(rows):4d} {q([r[0] for r in rows]):>16s} "
              f"{q([r[1] for r in rows]):>16s}")


if __name__ == "__main__":
    main()
