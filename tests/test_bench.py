"""`deltabox bench fs` (the quick matrix on a small synthetic tree, no network) and
`deltabox bench cr --quick` (DeltaCR on the demo image, 10 MB state).

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


def test_bench_cr_quick_json():
    """`deltabox bench cr --quick`: the 10 MB state only. Shape only, no timings."""
    r = subprocess.run([sys.executable, "-m", "deltabox.cli", "bench", "cr", "--quick", "--json"],
                       capture_output=True, timeout=90)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    doc = json.loads(r.stdout)
    for key in ("host", "config", "states", "results", "baselines", "ratios", "targets", "notes",
                "leaks", "elapsed_s"):
        assert key in doc, key
    assert doc["benchmark"] == "deltabox bench cr"
    assert doc["config"]["quick"] is True and doc["config"]["rss_mb"] == [10]
    assert [s["rss_mb"] for s in doc["states"]] == [10]
    assert not any(n.startswith("FAILED") for n in doc["notes"]), doc["notes"]

    ops = {r["op"] for r in doc["results"]}
    want = {"exec true (idle)", "checkpoint (full)", "exec right after checkpoint returns",
            "exec issued during checkpoint (at freeze)", "rollback (double)",
            "rollback (restore)", "rollback right after checkpoint"}
    want |= {f"fork {n} ({k})" for n in doc["config"]["forks"] for k in ("cold", "pre-warmed")}
    assert want <= ops, want - ops
    for r in doc["results"]:
        assert r["rss_mb"] == 10 and r["iterations"] > 0, r
        assert r["grpc_ms"]["p50"] <= r["grpc_ms"]["p95"], r
        if r["op"] == "checkpoint (full)":
            assert {"frozen_ms", "dump_ms", "commit_ms"} <= set(r["breakdown_p50_ms"]), r
        if r["op"].startswith("rollback"):
            assert sum(r["paths"].values()) == r["iterations"], r
        if r["op"].startswith("fork"):
            assert r["daemon_ms"]["p50"] > 0 and r.get("failed_children", 0) == 0, r

    assert {b["op"] for b in doc["baselines"]} == {
        "criu dump (CLI, --leave-running)", "shutil.copytree of the sandbox root",
        "checkpoint: criu dump + copytree", "rollback: restore path + copytree"}
    assert [r["rss_mb"] for r in doc["ratios"]] == [10]
    assert {"vs_checkpoint", "vs_rollback_double", "vs_rollback_double_grpc"} <= set(
        doc["ratios"][0])
    assert len(doc["targets"]) >= 5
    assert all(t["status"] in ("met", "NOT met", "n/a") for t in doc["targets"])
