"""rl_examples/gpu_e2e.py: the sandbox side of a round, the schedules and U, on the real
test daemon; and the whole harness in its CPU smoke mode where torch is installed.

The sandbox side and the schedules need no torch, so they are tested everywhere: a round
really execs, checkpoints and rolls back (the rolled-back env's files are the parent's,
seen in the sandbox); the baseline really runs plain CRIU (its image files exist); the
overlapped schedule leaves sandbox work running across the policy's phases while the
sequential one never does, and each generation's prompts are the previous round's exec
output. The policy in those tests is a stand-in that records its prompts and sleeps for
its device time (the policy is not what they test). The smoke test runs the real policy
(a two-layer model) on the CPU, end to end, against a throw-away daemon.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deltabox

EXAMPLES = Path(__file__).resolve().parent.parent / "rl_examples"


def load():
    spec = importlib.util.spec_from_file_location("rl_examples_gpu_e2e", EXAMPLES / "gpu_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


e2e = load()


class RecordingPolicy:
    """Stands in for the torch policy: records the prompts it is given, holds the
    'device' for `seconds` per phase, and derives its actions from the prompts."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.prompts: list[list[bytes]] = []

    def generate(self, observations):
        self.prompts.append(list(observations))
        time.sleep(self.seconds)
        return [[len(o) % 7 + 1, o[-1] if o else 0] for o in observations]

    def train_step(self):
        time.sleep(self.seconds)


def intersects(a, b) -> bool:
    return a[2] < b[3] and b[2] < a[3]


def test_utilisation_and_actions():
    assert e2e.utilisation(1.0, 1.0, 4.0) == 0.5
    with pytest.raises(ValueError):
        e2e.utilisation(1.0, 0.0, 0.0)
    a, b = e2e.action_command(3, [1, 2, 3]), e2e.action_command(3, [3, 2, 1])
    assert a == e2e.action_command(3, [1, 2, 3]) and a != b and "r3 " in a


def test_medians_and_quiet_utilisation():
    runs = [{"schedule": s, "envs": 4, "rounds": 2, "wall_s": w, "t_gen_s": 1.0,
             "t_train_s": 0.5, "t_wait_s": w - 1.5, "U": 1.5 / w}
            for s, w in (("sequential", 3.0), ("baseline", 5.0), ("overlapped", 1.6))]
    runs.append({**runs[2], "t_gen_s": 1.3, "U": 1.8 / 1.6})  # slowed by background work
    e2e.add_quiet_utilisation(runs)
    assert runs[0]["U_quiet"] == pytest.approx(0.5)
    assert runs[3]["U_quiet"] == pytest.approx(1.5 / 1.6)  # the quiet time, not 1.8
    m = e2e.medians(runs)["4"]
    assert m["overlapped"]["runs"] == 2 and m["baseline"]["U"] == pytest.approx(0.3)


def test_a_round_execs_checkpoints_and_rolls_back(client):
    fleet = e2e.Fleet(client, 2, full=True, workers=2)
    try:
        h = fleet.start_round(0, [[1], [2]], "deltabox", [False, False])
        first = h.observations()
        h.wait()
        assert all(o.startswith(b"lines 1 bytes ") for o in first), first
        h = fleet.start_round(1, [[1], [2]], "deltabox", [False, True])
        assert all(o.startswith(b"lines 2 ") for o in h.observations())
        h.wait()
        logs = [e.sandbox.exec("cat /work/log").stdout for e in fleet.envs]
        assert logs[0].count(b"\n") == 2  # kept round 1
        assert logs[1].count(b"\n") == 1 and logs[1].startswith(b"r0 ")  # back to round 0
        assert fleet.counts["deltabox checkpoints"] == 4
        assert fleet.counts["deltabox rollbacks"] == 1
        assert [len(e.checkpoints) for e in fleet.envs] == [2, 3]
        assert len(fleet.timeline.durations_ms("rollback")) == 1
    finally:
        fleet.close()


def test_a_round_queues_every_exec_before_any_checkpoint(client):
    """With fewer workers than envs, no exec (the next prompt) waits behind another
    env's checkpoint."""
    fleet = e2e.Fleet(client, 3, full=False, workers=2)
    try:
        fleet.start_round(0, [[1], [2], [3]], "deltabox", [False] * 3).wait()
        events = fleet.timeline.events
    finally:
        fleet.close()
    execs = [e for e in events if e[0] == "exec"]
    checkpoints = [e for e in events if e[0] == "checkpoint"]
    assert len(execs) == len(checkpoints) == 3
    assert max(e[2] for e in execs) <= min(c[2] for c in checkpoints)  # every exec started


def test_a_fleet_that_fails_to_create_leaves_no_sandbox(client):
    """One create failing (its name is taken) raises that error, after the others are
    created and destroyed again: none is left for the next fleet's names to collide with."""
    taken = client.create("tiny", "e2e-3-1")
    try:
        with pytest.raises(deltabox.DeltaboxError, match="e2e-3-1"):
            e2e.Fleet(client, 3, full=False, workers=3)
        names = {s.name for s in client.list()}
        assert "e2e-3-0" not in names and "e2e-3-2" not in names
    finally:
        taken.destroy()


def test_policy_cpus_split_this_process_affinity():
    cpus = sorted(os.sched_getaffinity(0))
    assert e2e.split_cpus(0) is None
    assert e2e.split_cpus(len(cpus)) is None  # nothing left to the sandboxes
    if len(cpus) >= 4:
        policy, rest = e2e.split_cpus(2)
        assert policy == set(cpus[:2]) and rest == set(cpus[2:])


def test_the_baseline_runs_plain_criu(client):
    fleet = e2e.Fleet(client, 1, full=True, workers=1)
    try:
        if fleet.criu is None:
            pytest.fail("no criu binary: the daemon's full checkpoints need one too")
        fleet.start_round(0, [[5]], "baseline", [False]).wait()
        fleet.start_round(1, [[6]], "baseline", [True]).wait()
        dirs = fleet.envs[0].baseline_dirs
        assert len(dirs) == 2
        for d in dirs:
            assert list((d / "img").glob("*.img")), f"no CRIU images in {d}"
            assert (d / "snap" / "work" / "log").exists()
        assert (dirs[1] / "snap" / "work" / "log").read_bytes().count(b"\n") == 2
        assert fleet.counts["baseline rollbacks"] == 1
        assert fleet.envs[0].checkpoints == []  # DeltaBox was not used
    finally:
        fleet.close()
    assert not any(d.exists() for d in dirs)


@pytest.mark.parametrize("schedule", ["sequential", "overlapped"])
def test_schedules(client, schedule):
    fleet = e2e.Fleet(client, 2, full=False, workers=2)
    policy = RecordingPolicy(0.3)
    try:
        r = e2e.run_schedule(schedule, policy, fleet, 3, 0.5, random.Random(1))
        events = fleet.timeline.events
    finally:
        fleet.close()
    assert r["envs"] == 2 and r["rounds"] == 3 and 0 < r["U"] <= 1
    assert r["t_gen_s"] >= 0.9 and r["t_train_s"] >= 0.9
    assert r["ops_ms"]["checkpoint"]["n"] == 6 and r["ops_ms"]["exec"]["n"] == 6
    assert r["rollbacks"] == fleet.counts["deltabox rollbacks"] > 0
    # each timed generation (after the warm-up's) was prompted with the previous
    # round's exec output
    timed = policy.prompts[1:]
    assert timed[0] == [b"start", b"start"]
    for rnd in (0, 1):
        assert timed[rnd + 1] == [e.history[rnd] for e in fleet.envs]
        assert all(p.startswith(b"lines ") for p in timed[rnd + 1])
    policy_phases = [e for e in events if e[0] in ("generate", "train")]
    sandbox = [e for e in events if e[0] in ("exec", "checkpoint", "rollback")]
    overlaps = [s for s in sandbox if any(intersects(s, p) for p in policy_phases)]
    if schedule == "sequential":
        assert overlaps == []
    else:
        assert overlaps, "the overlapped schedule ran no sandbox work beside the policy"


def test_cpu_smoke_end_to_end(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed here: the policy of "
                                        "gpu_e2e.py cannot run (the tests above need none)")
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(EXAMPLES / "gpu_e2e.py"), "--device", "cpu",
                        "--tiny-model", "--envs", "2", "--rounds", "2", "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert sorted(x["schedule"] for x in doc["runs"]) == sorted(e2e.SCHEDULES)
    assert all(0 < x["U"] <= 1 and x["ops_ms"]["checkpoint"]["n"] == 4 for x in doc["runs"])
    assert doc["policy"]["device"] == "cpu" and doc["source"] == e2e.SOURCE
    assert doc["skipped"] == [] and doc["errors"] == {} and "gpu_e2e.py" in doc["command"]
