"""`deltabox bench cr`'s verdicts and tables, computed from the JSON document alone.

Ratios are baseline p50 / DeltaCR gRPC p50 (what the client waits for), per state, for
both baselines: "plain" (criu dump / restore + cp of the changed files, the primary one)
and "copytree" (the same with the whole root copied, second and labelled). Targets are
judged on gRPC p50 at the worst state, daemon p50 beside; best-case rows (a ready
double, a warm pool) are labelled so, and the paths users hit (right after a
checkpoint, a non-head checkpoint via restore, a fork including its Warm) have targets.
"Fork 16 cold as fast as the machine allows" is judged on the fork's own CPU: the
daemon's accounting cgroup (daemon + CRIU + sandboxes) over wall time x cores, which
other work on the host cannot inflate.
"""

from __future__ import annotations

from deltabox.bench.cr_baseline import (CHECKPOINT_COPYTREE, CHECKPOINT_PLAIN,
                                        ROLLBACK_COPYTREE, ROLLBACK_PLAIN)
from deltabox.bench.report import fmt, render_targets_and_notes, target, worst_grpc

__all__ = ["cr_ratios", "cr_targets", "cr_result_notes", "render_cr", "CR_TARGETS_MS",
           "CR_BASELINE_SPEEDUP", "CR_CPU_USE"]

CR_TARGETS_MS = {"rollback": 2.0, "fork16_warm": 60.0}
CR_BASELINE_SPEEDUP = 100.0     # rollback via the double vs plain criu restore + cp
CR_CPU_USE = 0.85               # fork 16 cold: its own CPU / (wall x cores)
CR_WARM_OVERHEAD = 1.2          # Warm(16) + Fork vs a cold Fork(16)

BASELINES = {"plain": (CHECKPOINT_PLAIN, ROLLBACK_PLAIN),
             "copytree": (CHECKPOINT_COPYTREE, ROLLBACK_COPYTREE)}
# DeltaCR rows each ratio divides by: key -> (op, children the baseline repeats)
VERSUS = {"vs_checkpoint": ("checkpoint (full)", 0),
          "vs_rollback_double": ("rollback (double)", 1),
          "vs_rollback_early": ("rollback right after checkpoint", 1),
          "vs_rollback_restore": ("rollback (restore)", 1),
          "vs_fork_16_cold": ("fork 16 (cold)", 16),
          "vs_fork_16_warm_incl": ("fork 16 (pre-warmed) incl. Warm", 16)}


def _find(doc: dict, op: str, mb: int, key: str = "results") -> dict | None:
    return next((r for r in doc[key] if r["op"] == op and r["rss_mb"] == mb), None)


def cr_ratios(doc: dict) -> list[dict]:
    out = []
    for st in doc["states"]:
        mb = st["rss_mb"]
        for kind, (ck_op, rb_op) in BASELINES.items():
            bc, br = _find(doc, ck_op, mb, "baselines"), _find(doc, rb_op, mb, "baselines")
            if not bc and not br:
                continue
            row: dict = {"rss_mb": mb, "baseline": kind}
            if bc:
                row["baseline_checkpoint_ms"] = bc["ms"]
            if br:
                row["baseline_rollback_ms"] = br["ms"]
            for key, (op, times) in VERSUS.items():
                ours, b = _find(doc, op, mb), (br if times else bc)
                if ours and b:
                    base = b["ms"]["p50"] * max(1, times)
                    row[key] = round(base / ours["grpc_ms"]["p50"], 1)
                    if ours.get("daemon_ms") and ours["daemon_ms"]["p50"]:
                        row[key + "_daemon"] = round(base / ours["daemon_ms"]["p50"], 1)
            out.append(row)
    return out


def _ratio_target(out: list, doc: dict, name: str, key: str, limit: float) -> None:
    rat = [r for r in doc["ratios"] if r["baseline"] == "plain" and key in r]
    if not rat:
        out.append(target(name, f">= {limit:g}x", None, "no baseline", None))
        return
    w = min(rat, key=lambda r: r[key])
    where = ", ".join(f"{r['rss_mb']} MB {r[key]:,.1f}x (daemon-side "
                      f"{r.get(key + '_daemon', 0):,.1f}x; vs the copytree 2nd baseline "
                      f"{_second(doc, r['rss_mb'], key)})" for r in rat)
    out.append(target(name, f">= {limit:g}x", w[key], where, w[key] >= limit))


def _second(doc: dict, mb: int, key: str) -> str:
    r = next((r for r in doc["ratios"] if r["rss_mb"] == mb and r["baseline"] == "copytree"),
             None)
    return f"{r[key]:,.1f}x" if r and key in r else "-"


def cr_targets(doc: dict) -> list[dict]:
    res = doc["results"]
    out: list[dict] = []

    def ops(op: str) -> list[dict]:
        return [r for r in res if r["op"] == op]

    rb = ops("rollback (double)")
    v, where = worst_grpc(rb)
    floor = next((r for r in res if r["op"].startswith("GetSandbox (gRPC floor, after")), None)
    if floor:
        where += f"; the gRPC floor (GetSandbox after the same pause) {floor['grpc_ms']['p50']:.2f}"
    limit = CR_TARGETS_MS["rollback"]
    out.append(target("rollback via the double (best case: double ready)", f"<= {limit} ms",
                      v, where, None if v is None else v <= limit))
    _ratio_target(out, doc, "rollback via the double vs plain criu restore + cp changed files",
                  "vs_rollback_double", CR_BASELINE_SPEEDUP)
    _ratio_target(out, doc, "rollback right after a checkpoint (double not ready) no slower "
                  "than plain criu restore + cp", "vs_rollback_early", 1.0)
    _ratio_target(out, doc, "rollback to a non-head checkpoint (CRIU restore path) no slower "
                  "than plain criu restore + cp", "vs_rollback_restore", 1.0)
    _ratio_target(out, doc, "full checkpoint no slower than plain criu dump + cp changed files",
                  "vs_checkpoint", 1.0)
    flat = "max <= 1.5 x min + 0.5 ms"
    if len(rb) >= 2:
        p50s = [r["grpc_ms"]["p50"] for r in rb]
        lo, hi = min(p50s), max(p50s)
        out.append(target("rollback via the double flat in RSS (best case)", flat,
                          round(hi / lo, 2), f"{lo:.2f}..{hi:.2f} ms over {len(rb)} states",
                          hi <= 1.5 * lo + 0.5))
    else:
        out.append(target("rollback via the double flat in RSS (best case)", flat, None,
                          "needs two states", None))
    fw = ops("fork 16 (pre-warmed)")
    v, where = worst_grpc(fw)
    limit = CR_TARGETS_MS["fork16_warm"]
    out.append(target("fork 16 after Warm(16) (best case: pool ready, Fork alone)",
                      f"<= {limit:g} ms", v, where, None if v is None else v <= limit))
    incl, cold = ops("fork 16 (pre-warmed) incl. Warm"), ops("fork 16 (cold)")
    parts, ok = [], None
    for r in incl:
        c = next((c for c in cold if c["rss_mb"] == r["rss_mb"]), None)
        if c:
            q = r["grpc_ms"]["p50"] / c["grpc_ms"]["p50"]
            parts.append((q, f"{r['rss_mb']} MB: {r['grpc_ms']['p50']:.0f} vs cold "
                             f"{c['grpc_ms']['p50']:.0f} ms"))
            ok = (ok is not False) and q <= CR_WARM_OVERHEAD
    out.append(target("fork 16 including its Warm(16, wait=True) vs a cold fork 16",
                      f"<= {CR_WARM_OVERHEAD:g} x cold", round(max(p[0] for p in parts), 2)
                      if parts else None, "; ".join(p[1] for p in parts) or "not measured", ok))
    out.append(_cpu_target(doc, cold))
    from deltabox.bench.cr_memory import memory_targets  # issue 10: memory per double, fork
    return out + memory_targets(doc)


def _cpu_target(doc: dict, cold: list[dict]) -> dict:
    name = "fork 16 cold as fast as the machine allows: its own CPU / (wall x cores)"
    limit = f">= {100 * CR_CPU_USE:.0f}%"
    rows = [r for r in cold if "fork_cpu_use_pct" in r]
    if not rows:
        return target(name, limit, None, "not measured", None)
    ncpu = doc["host"]["cpus"] or 1
    load = doc["host"].get("loadavg_end", [None])[0]
    parts = []
    for r in rows:
        one = _find(doc, "fork 1 (cold)", r["rss_mb"])
        core_ms = r["fork_core_ms"]["p50"]
        bound = max(one["grpc_ms"]["p50"] if one else 0.0, core_ms / ncpu)
        parts.append(f"{r['rss_mb']} MB: wall {r['grpc_ms']['p50']:.0f} ms, own CPU "
                     f"{core_ms:.0f} core-ms = {r['fork_cpu_use_pct']['p50']:.0f}% of "
                     f"{ncpu} cores; bound max(fork 1, core-ms / cores) = {bound:.0f} ms")
    worst = min(rows, key=lambda r: r["fork_cpu_use_pct"]["p50"])
    v = worst["fork_cpu_use_pct"]["p50"]
    return target(name, limit, v, "; ".join(parts) + f"; host load {load}",
                  v >= 100 * CR_CPU_USE)


def cr_result_notes(doc: dict, budget: int) -> list[str]:
    """What the rows show that deserves a sentence: unexpected rollback paths, failed
    fork children, a warm pool over `budget` bytes or short of doubles."""
    notes: list[str] = []
    for r in doc["results"]:
        paths = r.get("paths") or {}
        want = {"rollback (double)": {"double"}, "rollback (restore)": {"restore"},
                "rollback right after checkpoint": {"double", "double-waited"}}.get(r["op"])
        if want and set(paths) - want:
            notes.append(f"{r['rss_mb']} MB {r['op']}: the daemon took paths {paths}")
        if r["op"].startswith("fork") and r.get("failed_children"):
            notes.append(f"{r['rss_mb']} MB {r['op']}: {r['failed_children']} children "
                         "failed")
        if r["op"].endswith("(pre-warmed)") and r.get("pool_mib", 0) << 20 > budget:
            notes.append(f"{r['rss_mb']} MB {r['op']}: the pool of {r['n']} doubles held "
                         f"{r['pool_mib']:,} MiB, over warm_budget_bytes "
                         f"({budget >> 20:,} MiB): the budget only evicts other pools")
        if r["op"].endswith("(pre-warmed)") and r.get("warm_ready_min", r["n"]) < r["n"]:
            notes.append(f"{r['rss_mb']} MB {r['op']}: Warm({r['n']}) had only "
                         f"{r['warm_ready_min']} doubles ready; the rest started cold")
    return notes


def render_cr(doc: dict, console) -> None:
    from rich.table import Table
    st = Table("RSS MB", "memory limit MiB", "Python VmRSS MiB", "full checkpoints",
               "image MiB p50", "shared with parent MiB p50", "set-up s",
               title="states (a bash session + a Python session holding RSS MB)",
               box=None, header_style="bold")
    for s in doc["states"]:
        st.add_row(str(s["rss_mb"]), str(s["memory_limit_mb"]), str(s["python_vmrss_mb"]),
                   fmt(s.get("checkpoints")), fmt(s.get("image_mb_p50")),
                   fmt(s.get("image_shared_mb_p50")), fmt(s["setup_s"]))
    console.print(st)

    order = ["frozen_ms", "freeze_ms", "sink_fs_ms", "dump_ms", "thaw_ms", "commit_ms",
             "issued_after_ms", "waited_for_checkpoint_ms", "after_checkpoint_ms"]
    hide = {"copy_ms", "sink_ms"}  # sums of the parts shown
    tab = Table("operation", "RSS MB", "iters", "gRPC p50", "gRPC p95", "daemon p50",
                "daemon p95", "handler p50", "daemon breakdown p50 / notes",
                title="DeltaCR (ms)", box=None, header_style="bold")
    for r in doc["results"]:
        parts = r.get("breakdown_p50_ms", {})
        keys = [k for k in order if k in parts] + sorted(
            k for k in parts if k not in order and k not in hide)
        extra = [" ".join(f"{k.removesuffix('_ms')} {parts[k]:.1f}" for k in keys)]
        if r.get("double_ready_ms"):
            extra.append(f"double ready {r['double_ready_ms']['p50']:.0f} after")
        if r.get("image_mb"):
            extra.append(f"image {r['image_mb']['p50']:.0f} MiB")
        if r.get("paths"):
            extra.append("paths " + ", ".join(f"{k} {v}" for k, v in r["paths"].items()))
        if "fork_core_ms" in r:
            extra.append(f"own CPU {r['fork_core_ms']['p50']:.0f} core-ms = "
                         f"{r['fork_cpu_use_pct']['p50']:.0f}% of the cores")
        if r.get("warm_ms"):
            extra.append(f"Warm({r['n']}, wait) took {r['warm_ms']['p50']:.0f}, pool "
                         f"{r.get('pool_mib', 0):,} MiB")
        if r.get("failed_children"):
            extra.append(f"{r['failed_children']} children FAILED")
        d, h, g = r["daemon_ms"] or {}, r["handler_ms"] or {}, r["grpc_ms"]
        tab.add_row(r["op"], fmt(r["rss_mb"]), str(r["iterations"]), fmt(g["p50"]),
                    fmt(g["p95"]), fmt(d.get("p50")), fmt(d.get("p95")), fmt(h.get("p50")),
                    "; ".join(x for x in extra if x))
    console.print(tab)

    bl = Table("baseline (host, store's XFS)", "RSS MB", "iters", "p50 ms", "p95 ms", "size",
               title="baselines", box=None, header_style="bold")
    for b in doc["baselines"]:
        size = f"{b['image_mb']:.0f} MiB images" if "image_mb" in b else \
            f"{b['files']:,} files, {b['mib']} MiB" if "mib" in b else \
            f"{b['files']} file(s)" if "files" in b else ""
        bl.add_row(b["op"], str(b["rss_mb"]), str(b["iterations"]), fmt(b["ms"]["p50"]),
                   fmt(b["ms"]["p95"]), size)
    console.print(bl)

    rt = Table("RSS MB", "baseline", "ckpt p50", "rollback p50",
               *(k.removeprefix("vs_") for k in VERSUS),
               title="speed-up: baseline p50 / DeltaCR gRPC p50 (fork: 16 x baseline rollback)",
               box=None, header_style="bold")
    for r in doc["ratios"]:
        rt.add_row(str(r["rss_mb"]), r["baseline"],
                   fmt((r.get("baseline_checkpoint_ms") or {}).get("p50")),
                   fmt((r.get("baseline_rollback_ms") or {}).get("p50")),
                   *(f"{r[k]:,.1f}x" if k in r else "-" for k in VERSUS))
    console.print(rt)
    render_targets_and_notes(doc, console)
