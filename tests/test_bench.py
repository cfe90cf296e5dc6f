"""`deltabox bench fs`: the quick matrix on a small synthetic tree (no network).

Checks the shape of the JSON document only -- timings depend on the machine and
are never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_fs_quick_json():
    r = subprocess.run([sys.executable, "-m", "deltabox.cli", "bench", "fs", "--quick", "--json",
                        "--tree", "synthetic:300", "--iterations", "3"],
                       capture_output=True, timeout=170)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    doc = json.loads(r.stdout)
    for key in ("host", "config", "trees", "results", "baselines", "ratios", "targets", "notes",
                "elapsed_s"):
        assert key in doc, key
    assert doc["config"]["quick"] is True
    assert doc["trees"] == [{"name": "synthetic:300", "files": 300, "dirs": doc["trees"][0]["dirs"],
                             "bytes": doc["trees"][0]["bytes"],
                             "sources": ["synthetic: 300 generated files"]}]

    cells = {(r["op"], r["step_files"], r["depth"]) for r in doc["results"]}
    depths, steps = doc["config"]["depths"], doc["config"]["steps"]
    for d in depths:
        for k in steps:
            assert ("checkpoint", k, d) in cells
        assert ("rollback standby", 10, d) in cells
        assert ("rollback fresh", 10, d) in cells
        for n in doc["config"]["forks"]:
            assert (f"fork {n}", None, d) in cells
    for r in doc["results"]:
        assert r["iterations"] > 0 and r["grpc_ms"]["p50"] > 0, r
        assert r["grpc_ms"]["p50"] <= r["grpc_ms"]["p95"], r
        if r["op"].startswith(("checkpoint", "rollback", "fork")):
            assert r["daemon_ms"]["p50"] > 0, r
        if r["op"] == "checkpoint":
            assert {"frozen_ms", "sink_ms", "commit_ms"} <= set(r["breakdown_p50_ms"]), r
        if r["op"].startswith("rollback"):
            assert sum(r["paths"].values()) == r["iterations"], r
        if r["op"].startswith("fork"):
            assert r.get("failed_children", 0) == 0, r

    ops = {b["op"] for b in doc["baselines"]}
    assert ops == {"shutil.copytree", "cp -a --reflink=always", "tar c (archive)",
                   "tar x (restore)"}
    assert all(b["ms"]["p50"] > 0 for b in doc["baselines"])
    assert {r["baseline"] for r in doc["ratios"]} == ops
    assert all(r["vs_checkpoint_10_files"] > 0 for r in doc["ratios"])
    assert len(doc["targets"]) >= 5
    assert all(t["status"] in ("met", "NOT met", "n/a") for t in doc["targets"])
    # 300 files: the copytree target needs a tree of >= 2,000 files.
    assert any(t["status"] == "n/a" and "copytree" in t["target"] for t in doc["targets"])
