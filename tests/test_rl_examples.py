"""The rl_examples do what their docstrings say, at a small size, on the test daemon.

Each test would fail if the example stopped measuring what it claims: rollouts must
roll back exactly the environments its destructive actions broke (observed in the
sandbox, not guessed from the action's text); tree_search must leave the root at the
best child's files and session; sandbox_latencies must give every operation, DeltaBox
and baseline alike, the same number of samples; gpu_harness's overlapped schedule must
hide sandbox time that the sequential one waits for.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import deltabox

EXAMPLES = Path(__file__).resolve().parent.parent / "rl_examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"rl_examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_example(daemon, name: str, *args: str, timeout: float = 300) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--socket",
                        str(daemon.socket), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("overlapped", [False, True])
def test_rollouts_roll_back_the_environments_their_actions_broke(daemon, overlapped):
    rollouts = load("rollouts")
    args = types.SimpleNamespace(envs=2, steps=5, gen_ms=50.0, train_ms=0.0, p_fail=0.5)
    # The actions each environment will be given (same seeds as the example's).
    expected = 0
    for seed in range(args.envs):
        rng = random.Random(seed)
        for _ in range(args.steps):
            if rng.random() < args.p_fail:
                rng.choice(rollouts.DESTRUCTIVE)
                expected += 1
            else:
                rng.randint(0, 1000)
    assert expected > 0

    async def go():
        async with deltabox.AsyncClient(daemon.socket) as c:
            return await rollouts.run_schedule(c, args, overlapped)
    r = asyncio.run(go())
    assert r["rollbacks"] == expected
    assert r["wall_s"] >= r["t_gen_s"] >= args.steps * args.gen_ms / 1000
    assert r["latency_ms"]["checkpoint"]["n"] == args.envs * args.steps - expected


def test_rollouts_leave_no_sandbox_when_an_environment_fails_to_start(daemon, monkeypatch):
    """One environment failing to start (here: its bash session cannot open, after its
    sandbox was created) raises that error; the sandboxes of every environment, that one
    and those that started, are destroyed again."""
    rollouts = load("rollouts")
    args = types.SimpleNamespace(envs=3, steps=1, gen_ms=0.0, train_ms=0.0, p_fail=0.0)
    real = rollouts.Environment.create.__func__

    async def create(cls, client, seed, lat):
        if seed == 1:
            real_create = client.create

            async def create_then_fail(*a, **kw):
                sbx = await real_create(*a, **kw)
                sbx.open_session = _refuse
                return sbx
            client = types.SimpleNamespace(create=create_then_fail)
        return await real(cls, client, seed, lat)

    async def _refuse(*a, **kw):
        raise RuntimeError("no bash today")
    monkeypatch.setattr(rollouts.Environment, "create", classmethod(create))

    async def go():
        async with deltabox.AsyncClient(daemon.socket) as c:
            before = {s.id for s in await c.list()}
            with pytest.raises(RuntimeError, match="no bash today"):
                await rollouts.run_schedule(c, args, False)
            return before, {s.id for s in await c.list()}
    before, after = asyncio.run(go())
    assert after == before


@pytest.mark.demo_image  # the example creates "demo" sandboxes
def test_tree_search_rolls_the_root_back_to_the_best_child(daemon):
    out = run_example(daemon, "tree_search", "--width", "4")
    assert ", 0 failing;" in out, out
    assert "rollback path" in out
    history = next(line for line in out.splitlines() if line.startswith("history"))
    kept = [line.split("'")[1] for line in out.splitlines()
            if line.startswith("level ") and "rolled back" in line]
    assert kept and all(k in history for k in kept), out
    assert "modified /work/repo/calc.py" in out


@pytest.mark.demo_image  # the example creates "demo" sandboxes
def test_sandbox_latencies_same_samples_for_deltabox_and_baseline(daemon, tmp_path):
    out = tmp_path / "lat.json"
    run_example(daemon, "sandbox_latencies", "--iterations", "2", "--rss-mb", "10",
                "--no-whole-root", "--out", str(out))
    doc = json.loads(out.read_text())
    counts = {op: s["n"] for op, s in doc["summary"].items()}
    assert counts == {op: 2 for op in ("action", "checkpoint", "rollback", "rollback_ready",
                                       "restore", "baseline_checkpoint",
                                       "baseline_rollback")}, counts
    assert doc["rollback_paths"]["rollback_ready: double"] == 2
    assert doc["rollback_paths"]["restore: restore"] == 2
    assert all(s["p95"] >= s["p50"] > 0 for s in doc["summary"].values())


class _BusyPolicy:
    """Real CPU work of fixed length in place of the GPU (torch is not needed to check
    how the schedules wait)."""

    def __init__(self, gen_s: float, train_s: float):
        self.gen_s, self.train_s = gen_s, train_s

    @staticmethod
    def _busy(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def generate(self) -> None:
        self._busy(self.gen_s)

    def train_step(self) -> None:
        self._busy(self.train_s)


def test_gpu_harness_overlap_hides_sandbox_time(tmp_path):
    harness = load("gpu_harness")
    ms = {"action": [5.0], "checkpoint": [40.0], "rollback": [20.0],
          "baseline_checkpoint": [80.0], "baseline_rollback": [60.0]}
    path = tmp_path / "samples.json"
    path.write_text(json.dumps({"samples_ms": ms}))
    samples = harness.load_samples(str(path))
    args = types.SimpleNamespace(steps=6, p_fail=1.0)
    replay = harness.SandboxReplay()
    try:
        runs = {name: harness.run_schedule(name, _BusyPolicy(0.1, 0.02), replay, samples,
                                           args, random.Random(0))
                for name in harness.SCHEDULES}
    finally:
        replay.close()
    seq, ovl = runs["sequential"], runs["overlapped"]
    # sequential waits for action + checkpoint + rollback every step: 65 ms x 6
    assert seq["t_wait_s"] >= 0.9 * 6 * 0.065
    # overlapped waits for the action only (the rest hides behind 120 ms of work)
    assert ovl["t_wait_s"] < 0.5 * seq["t_wait_s"]
    assert runs["baseline"]["t_wait_s"] > seq["t_wait_s"]
    assert runs["baseline-overlapped"]["t_wait_s"] < runs["baseline"]["t_wait_s"]
    assert all(0 < r["U"] <= 1 for r in runs.values())


@pytest.mark.demo_image  # the example creates "demo" sandboxes
def test_bug_search_finds_the_injected_fix_by_rolling_back_the_tree(daemon, tmp_path):
    """bug_search on the real project (more-itertools 10.5.0, two faults in windowed):
    every mode must find the upstream fix two edits deep, the tree must have branched
    (siblings reached by rolling back to their parent), and every mode must expand
    the same tree -- the runner in the sandbox checks before each node that the files
    (and, in full mode, the session) are the parent's, so a rollback that brought the
    wrong state back stops the search and fails this test."""
    project = load("bug_search").project
    try:
        project.sdist_path()
    except subprocess.CalledProcessError:
        pytest.skip(f"{project.SDIST} is not cached in {project.CACHE} and pip could not "
                    "download it (no network)")
    out = tmp_path / "bug-search.json"
    run_example(daemon, "bug_search", "--repeats", "1", "--seed", "4", "--budget", "40",
                "--out", str(out), timeout=900)
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"full", "fs", "baseline"}
    for mode, r in runs.items():
        assert r["root_failures"] > 0 and r["suspects"][0] == "windowed", (mode, r)
        assert r["found"] and r["fix_is_upstream"] and r["fix_depth"] == 2, (mode, r["fix"])
        assert r["whole_suite_at_fix"]["failures"] == 0, mode
        assert r["whole_suite_at_fix"]["ran"] > 800, mode
        # Branched: a checkpoint with two kept children, in the daemon's own tree
        # (DeltaBox) or the baseline's records; siblings came after rollbacks.
        assert r["checkpoints_with_2_children"] >= 1, (mode, r["tree"])
        assert r["rollback_moves"].get("to the parent (next sibling)", 0) >= 2, mode
        assert r["rollbacks"] == r["ms"]["rollback"]["n"] == sum(r["rollback_moves"].values())
        # A rolled-back node's file is the one it recorded (checked after the search too).
        assert r["end_check"]["file_matches"], (mode, r["end_check"])
        assert r["nodes"] == r["ms"]["node"]["n"] and r["nodes_per_min"] > 0
    assert runs["full"]["end_check"]["session_matches"], runs["full"]["end_check"]
    assert runs["full"]["rollback_paths"] and "criu-restore" in runs["baseline"]["rollback_paths"]
    trees = {mode: r["tree"] for mode, r in runs.items()}
    assert trees["full"] == trees["fs"] == trees["baseline"], trees
