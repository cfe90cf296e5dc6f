"""`deltabox bench fs`'s verdicts and tables: speed-ups against the baselines and the
targets, computed from the JSON document alone (so tests can hand-build documents),
and the rich tables.

Every target is judged on the client's gRPC p50 at the worst tree/depth cell; the
daemon's own p50 is shown beside it. Best-case rows (a standby ready, a warm pool) have
targets of their own, labelled "best case"; the paths users hit (right after a
checkpoint, to a non-head checkpoint, a fork including its Warm) have theirs.
"""

from __future__ import annotations

from deltabox.bench.report import fmt, render_targets_and_notes, target, worst_grpc

__all__ = ["fs_ratios", "fs_targets", "render_fs", "TARGETS_MS", "ROLLBACK_BEST",
           "ROLLBACK_EARLY", "ROLLBACK_NON_HEAD", "COPYTREE_SPEEDUP", "SMALL_TREE_FILES"]

TARGETS_MS = {"checkpoint": 2.0, "rollback": 2.0, "fork16": 30.0}
COPYTREE_SPEEDUP = 50.0
SMALL_TREE_FILES = 2_000
FLAT = "max <= 1.5 x min + 0.5 ms"

ROLLBACK_BEST = "rollback standby (best case)"
ROLLBACK_EARLY = "rollback right after checkpoint"
ROLLBACK_NON_HEAD = "rollback to non-head"
ROLLBACKS = (ROLLBACK_BEST, ROLLBACK_EARLY, ROLLBACK_NON_HEAD)


def _rows(doc: dict, op: str, tree: str | None = None, **kw) -> list[dict]:
    return [r for r in doc["results"] if r["op"] == op
            and (tree is None or r["tree"] == tree)
            and all(r.get(k) == v for k, v in kw.items())]


def _worst(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["grpc_ms"]["p50"]) if rows else None


def fs_ratios(doc: dict) -> list[dict]:
    """Baseline p50 / DeltaFS gRPC p50 per tree and baseline, DeltaFS taken at its worst
    depth; "..._daemon" the same against the daemon's own p50, for comparison."""
    out = []
    for t in doc["trees"]:
        name = t["name"]
        ours = {"checkpoint_10_files": _worst(_rows(doc, "checkpoint", name, step_files=10)),
                **{op: _worst(_rows(doc, op, name)) for op in ROLLBACKS}}
        fk = _worst(_rows(doc, "fork 16", name))
        for b in doc["baselines"]:
            if b["tree"] != name:
                continue
            p50 = b["ms"]["p50"]
            row = {"tree": name, "baseline": b["op"], "baseline_p50_ms": p50,
                   "baseline_p95_ms": b["ms"]["p95"], "baseline_n": b["iterations"]}
            for key, r in ours.items():
                if r:
                    row[f"vs_{key}"] = round(p50 / r["grpc_ms"]["p50"], 1)
                    if r.get("daemon_ms"):
                        row[f"vs_{key}_daemon"] = round(p50 / r["daemon_ms"]["p50"], 1)
            if fk:  # 16 copies of the tree vs one fork of 16
                row["vs_fork_16"] = round(16 * p50 / fk["grpc_ms"]["p50"], 1)
            out.append(row)
    return out


def _limit_target(out: list, name: str, rows: list[dict], limit_ms: float) -> None:
    v, where = worst_grpc(rows)
    out.append(target(name, f"<= {limit_ms} ms", v, where,
                      None if v is None else v <= limit_ms))


def _flat_target(out: list, name: str, rows: list[dict]) -> None:
    if len(rows) < 2:
        out.append(target(name, FLAT, None, "needs two trees or depths", None))
        return
    p50s = [r["grpc_ms"]["p50"] for r in rows]
    lo, hi = min(p50s), max(p50s)
    out.append(target(name, FLAT, round(hi / lo, 2) if lo else None,
                      f"{lo:.2f}..{hi:.2f} ms over {len(rows)} tree/depth cells",
                      hi <= 1.5 * lo + 0.5))


def fs_targets(doc: dict) -> list[dict]:
    res = doc["results"]
    out: list[dict] = []

    def ops(op: str, **kw) -> list[dict]:
        return [r for r in res if r["op"] == op and all(r.get(k) == v for k, v in kw.items())]

    _limit_target(out, "checkpoint of a 10-file step", ops("checkpoint", step_files=10),
                  TARGETS_MS["checkpoint"])
    _limit_target(out, "rollback, standby ready (best case)", ops(ROLLBACK_BEST),
                  TARGETS_MS["rollback"])
    _limit_target(out, "rollback right after a checkpoint (standby not ready)",
                  ops(ROLLBACK_EARLY), TARGETS_MS["rollback"])
    _limit_target(out, "rollback to a non-head checkpoint", ops(ROLLBACK_NON_HEAD),
                  TARGETS_MS["rollback"])
    _limit_target(out, "fork of 16 (plain Fork, cold)", ops("fork 16"), TARGETS_MS["fork16"])
    warm = ops("fork 16 (warm)")
    if warm:
        _limit_target(out, "fork of 16 after Warm(16) (best case: pool ready, Fork alone)",
                      warm, TARGETS_MS["fork16"])
        _limit_target(out, "fork of 16 including its Warm(16, wait=True)",
                      ops("fork 16 incl. Warm"), TARGETS_MS["fork16"])
    # >= 50x faster than copytree on the smallest tree with >= 2,000 files: the worst of
    # the checkpoint and every rollback path, each at its worst depth.
    name = "faster than shutil.copytree (worst of checkpoint and the rollback paths)"
    small = sorted((t for t in doc["trees"] if t["files"] >= SMALL_TREE_FILES),
                   key=lambda t: t["files"])
    limit = f">= {COPYTREE_SPEEDUP:.0f}x"
    if small:
        t = small[0]
        r = next((r for r in doc["ratios"] if r["tree"] == t["name"]
                  and r["baseline"] == "shutil.copytree"), None)
        keys = ["vs_checkpoint_10_files"] + [f"vs_{op}" for op in ROLLBACKS]
        vals = {k: r[k] for k in keys if r and k in r}
        v = min(vals.values()) if vals else None
        where = f"{t['name']} ({t['files']:,} files)"
        if vals:
            k = min(vals, key=vals.get)
            where += (f": copytree p50 {r['baseline_p50_ms']:.0f} ms / {k.removeprefix('vs_')}"
                      f"; daemon-side {r.get(k + '_daemon', 0):,.0f}x")
        out.append(target(name, limit, v, where, None if v is None else v >= COPYTREE_SPEEDUP))
    else:
        out.append(target(name, limit, None, f"no tree with >= {SMALL_TREE_FILES:,} files",
                          None))
    _flat_target(out, "rollback flat in tree size and depth, standby (best case)",
                 ops(ROLLBACK_BEST))
    _flat_target(out, "rollback flat in tree size and depth, to a non-head checkpoint",
                 ops(ROLLBACK_NON_HEAD))
    return out


_BREAKDOWN_ORDER = ["freeze_ms", "copy_ms", "thaw_ms", "frozen_ms", "sink_ms", "commit_ms",
                    "kill_ms"]


def render_fs(doc: dict, console) -> None:
    from rich.table import Table
    trees = Table("tree", "files", "dirs", "MiB", "sources", title="trees (under /work of "
                  "the busybox rootfs)", box=None, header_style="bold")
    for t in doc["trees"]:
        trees.add_row(t["name"], f"{t['files']:,}", f"{t['dirs']:,}",
                      f"{t['bytes'] / 2**20:.0f}", ", ".join(t["sources"]))
    console.print(trees)

    tab = Table("operation", "tree", "step", "depth", "layers", "iters", "gRPC p50", "gRPC p95",
                "daemon p50", "daemon p95", "handler p50", "daemon breakdown p50 / notes",
                title="DeltaFS (ms)", box=None, header_style="bold")
    for r in doc["results"]:
        parts = r.get("breakdown_p50_ms", {})
        order = [k for k in _BREAKDOWN_ORDER if k in parts] + sorted(
            k for k in parts if k not in _BREAKDOWN_ORDER)
        extra = " ".join(f"{k.removesuffix('_ms')} {parts[k]:.2f}" for k in order)
        if r.get("paths"):
            extra = (extra + "; " if extra else "") + "paths " + ", ".join(
                f"{k} {v}" for k, v in r["paths"].items())
        if r.get("warm_ms"):
            extra += f"; Warm took {r['warm_ms']['p50']:.1f}"
        if r.get("failed_children"):
            extra += f"; {r['failed_children']} children FAILED"
        d, h, g = r["daemon_ms"] or {}, r["handler_ms"] or {}, r["grpc_ms"]
        tab.add_row(r["op"], r["tree"], fmt(r["step_files"]), fmt(r["depth"]),
                    fmt(r["mount_layers"]), str(r["iterations"]), fmt(g["p50"]), fmt(g["p95"]),
                    fmt(d.get("p50")), fmt(d.get("p95")), fmt(h.get("p50")), extra)
    console.print(tab)

    bl = Table("baseline (host, same XFS)", "tree", "iters", "p50 ms", "p95 ms",
               title="baselines", box=None, header_style="bold")
    for b in doc["baselines"]:
        bl.add_row(b["op"], b["tree"], str(b["iterations"]), fmt(b["ms"]["p50"]),
                   fmt(b["ms"]["p95"]))
    console.print(bl)

    cols = ["vs_checkpoint_10_files"] + [f"vs_{op}" for op in ROLLBACKS] + ["vs_fork_16"]
    rt = Table("tree", "baseline", "p50 ms", "÷ checkpoint 10 files", "÷ " + ROLLBACK_BEST,
               "÷ " + ROLLBACK_EARLY, "÷ " + ROLLBACK_NON_HEAD, "16 × baseline ÷ fork 16",
               title="speed-up: baseline p50 / DeltaFS gRPC p50 (worst depth)", box=None,
               header_style="bold")
    for r in doc["ratios"]:
        rt.add_row(r["tree"], r["baseline"], fmt(r["baseline_p50_ms"]),
                   *(f"{r[k]:,.0f}x" if k in r else "-" for k in cols))
    console.print(rt)

    if doc.get("squashes"):
        sq = Table("tree", "at depth", "chain layers", "seconds", title="background squashes "
                   "while building the chains", box=None, header_style="bold")
        for s in doc["squashes"]:
            sq.add_row(s["tree"], str(s["depth"]), str(s["chain_layers"]), fmt(s["seconds"]))
        console.print(sq)
    render_targets_and_notes(doc, console)
