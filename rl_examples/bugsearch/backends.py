"""Three ways to keep and return to search states, behind one interface.

A *node* of the search is a state of the sandbox: the project's files (one edit more
than its parent's) and, where processes are kept, a Python session that has the project
imported and knows which node it is at. Each backend makes and returns to such states:

  full      DeltaBox full checkpoints: files + processes. The session survives every
            rollback as it was at the node (the runner checks its node id), so tests
            run in a warm interpreter. Rollback paths as the daemon reports them.
  fs        DeltaBox fs checkpoints: files only. A rollback leaves no process, so each
            node's tests run in a fresh `python3` (the runner as a process).
  baseline  what a user does today, with the same session: plain `criu dump
            --leave-running` of the sandbox's tree + `cp -a --reflink=auto` of the
            project tree (/work) as the checkpoint; the node's /work copied into the
            user's container directory + plain `criu restore` of its dump onto it as the
            rollback (`rl_examples/sandbox_latencies.py`'s PlainCriu: the method of
            `deltabox/bench/cr_baseline.py`). The container directory is a copy of the
            sandbox's root made once, untimed, and bind-mounted, as in those benches.
            As there, the restored tree is killed afterwards and the tests go on in the
            live sandbox, whose /work gets the same copy: both of those are artefacts of
            measuring beside a daemon, so they are timed apart (`excluded_ms`) and left
            out of the node times and the wall clock. The live session is not rolled
            back (its node id is not checked); the runner re-imports the project anyway.

Every call returns what the caller times; `rollback` also returns the path taken.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sandbox_latencies import WORKSPACE, PlainCriu, kill_tree  # noqa: E402

RUNNER_DIR = "/opt/bugsearch"
RUNNER = f"{RUNNER_DIR}/bugsearch_runner.py"
MODES = ("full", "fs", "baseline")


class Backend:
    """The DeltaBox backends; `BaselineBackend` overrides checkpoint and rollback."""

    def __init__(self, mode: str, client, sandbox, scratch: Path, criu: Path | None):
        self.mode, self.client, self.sandbox = mode, client, sandbox
        self.session = None
        self.excluded_ms = 0.0   # measurement artefacts left out of the wall clock
        if mode != "fs":
            self.session = sandbox.open_session("python", name="search")
            self.session.run(f"import json, sys; sys.path.insert(0, {RUNNER_DIR!r}); "
                             "import bugsearch_runner as R")

    @property
    def checks_session(self) -> bool:
        """Whether a rollback brings the session back (so the runner can check it)."""
        return self.mode == "full"

    def call(self, request: dict) -> dict:
        """The runner's `request['call']` (step, full_suite, set_node), in the session
        or as a fresh process."""
        if self.session is not None:
            fn = request.get("call", "step")
            res = self.session.run(f"print(json.dumps(R.{fn}({request!r})))")
            out, err, code = res.stdout, res.stderr, res.exit_code
        else:
            res = self.sandbox.exec(["python3", RUNNER, json.dumps(request)])
            out, err, code = res.stdout, res.stderr, res.exit_code
        if code != 0:
            raise RuntimeError(f"runner failed ({code}): {err.decode(errors='replace')[-800:]}")
        return json.loads(out.decode().strip().splitlines()[-1])

    def checkpoint(self, label: str):
        return self.sandbox.checkpoint(label, full=self.mode == "full")

    def rollback(self, handle) -> str:
        return self.sandbox.rollback(handle).path.name

    def read_file(self, path: str) -> bytes:
        return self.sandbox.read_file(path)

    def checkpoint_tree(self, handles: dict) -> dict[str, str]:
        """checkpoint id -> parent checkpoint id, as the daemon records them."""
        ids = {h.id for h in handles.values()}
        return {c.id: c.parent_id for c in self.sandbox.checkpoints() if c.id in ids}

    def close(self) -> None:
        roots = {c.id for c in self.sandbox.checkpoints() if not c.parent_id}
        self.sandbox.destroy()
        for root in roots:
            try:
                self.client.delete_checkpoint(root, cascade=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


class BaselineBackend(Backend):
    """Plain CRIU + copies of /work (see the module docstring)."""

    def __init__(self, mode, client, sandbox, scratch: Path, criu: Path | None):
        if criu is None:
            raise RuntimeError("no criu binary found for the baseline")
        super().__init__(mode, client, sandbox, scratch, criu)
        self.criu = criu
        self.work = scratch / f"bugsearch-baseline-{time.monotonic_ns()}"
        self.container = self.work / "container"
        self.work.mkdir(parents=True)
        self.plain().copy_whole_root(self.container)   # the user's container directory
        subprocess.run(["mount", "--bind", str(self.container), str(self.container)],
                       check=True)
        self.parents: dict[str, str] = {}
        self.at: str = ""        # the checkpoint the live sandbox was last restored to
        self.retries = 0

    def plain(self) -> PlainCriu:
        # The init never changes here: no DeltaBox rollback happens on this sandbox.
        return PlainCriu(self.criu, self.sandbox.info.init_pid)

    def checkpoint(self, label: str) -> Path:
        d = self.work / f"ck-{len(self.parents)}-{label}"
        (d / "img").mkdir(parents=True)
        (d / "snap").mkdir()
        plain = self.plain()
        self.retries += plain.dump_retrying(d / "img")
        plain.copy_changed(plain.root, d / "snap")
        self.parents[d.name] = self.at
        self.at = d.name
        return d

    def rollback(self, handle: Path) -> str:
        plain = self.plain()
        (handle / "img" / "restored.pid").unlink(missing_ok=True)   # restored before
        plain.copy_changed(handle / "snap", self.container)
        restored = plain.restore(handle / "img", self.container)
        t0 = time.perf_counter()
        kill_tree(restored)
        plain.copy_changed(handle / "snap", plain.root)   # the live sandbox's /work
        self.excluded_ms += 1000 * (time.perf_counter() - t0)
        self.at = handle.name
        return "criu-restore"

    def checkpoint_tree(self, handles: dict) -> dict[str, str]:
        return {h.name: self.parents[h.name] for h in handles.values()}

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.container)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.work)], check=False)
        super().close()


def make_backend(mode: str, client, sandbox, scratch: Path, criu: Path | None) -> Backend:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    cls = BaselineBackend if mode == "baseline" else Backend
    return cls(mode, client, sandbox, scratch, criu)


__all__ = ["MODES", "RUNNER", "RUNNER_DIR", "WORKSPACE", "Backend", "make_backend"]
