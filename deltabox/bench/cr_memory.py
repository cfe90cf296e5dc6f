"""`memory per double` rows of `deltabox bench cr`: what 1 and 8 body doubles of one
sandbox cost, with and without KSM (the `ksm` setting, deltabox.host.ksm).

Each KSM mode runs on its own throw-away daemon (`--ksm off` / `--ksm on`), so the two
never share a ksmd state. On each: a demo sandbox whose Python session holds X MB of
os.urandom (incompressible: only identical copies can merge), a full checkpoint whose
body double is waited for (1 double), then Warm(checkpoint, 7, wait) (8 doubles). After
each step the memory is read once it is steady (with KSM: until ksmd's merged page count
stops growing; `merge_s` is that time, `ksmd_core_ms` ksmd's CPU meanwhile):

* cgroup: the bytes charged to the doubles' cgroups (v1 memory.usage_in_bytes, v2
  memory.current) -- what the warm budget counts; it includes the page cache of the
  images their restores read, charged to the first cgroup that read them;
* Pss: the proportional set size of the doubles' processes (smaps_rollup): a merged page
  is split among the processes that map it;
* the live sandbox's own cgroup and Pss, for the ratio `8 doubles / 1 sandbox`.

Run alone: `python -m deltabox.bench.cr_memory [MB]` prints the rows as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from deltabox.bench.common import CACHE, DaemonView
from deltabox.bench.report import target
from deltabox.host import ksm

__all__ = ["memory_per_double", "memory_targets", "render_memory", "pss_kib",
           "ksm_merging_pages"]

MiB = 1 << 20


def pss_kib(pids) -> int:
    """Sum of Pss (KiB) of `pids` from /proc/<pid>/smaps_rollup (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def ksm_merging_pages(pids) -> int:
    return sum(int(ksm.process_stat(p).get("ksm_merging_pages", 0)) for p in pids)


def _doubles(view: DaemonView, live: str) -> list[str]:
    return sorted(n for n in view.frozen_cgroups() if n != live)


def _footprint(view: DaemonView, names) -> dict:
    pids = [p for n in names for p in view.cgroups.pids(n)]
    return {"cgroup_mib": round(sum(view.cgroups.memory_usage(n) for n in names) / MiB, 1),
            "pss_mib": round(pss_kib(pids) / 1024, 1),
            "ksm_merging_pages": ksm_merging_pages(pids)}


def _steady(view: DaemonView, live: str, want: int, merging: bool, timeout: float) -> dict:
    """Wait for `want` doubles, then (with KSM) until two whole scans of ksmd merged
    nothing more (a page is merged at the earliest on the second scan that sees it
    unchanged); the doubles' footprint, the time until 90 % of the pages merged by then
    were merged (`merge_s`), and ksmd's CPU meanwhile."""
    t0, c0 = time.monotonic(), ksm.ksmd_cpu_seconds()
    while len(_doubles(view, live)) < want and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    first = ksm.read_state()
    scan, sharing = first.full_scans, first.pages_sharing
    samples = [(0.0, sharing)]
    while merging and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        now = ksm.read_state()
        samples.append((time.monotonic() - t0, now.pages_sharing))
        if now.pages_sharing != sharing:
            sharing, scan = now.pages_sharing, now.full_scans
        elif now.full_scans >= scan + 2 and now.full_scans >= first.full_scans + 3:
            break  # two whole scans without a new merge
    goal = first.pages_sharing + 0.9 * (sharing - first.pages_sharing)
    settled = next((t for t, v in samples if v >= goal), 0.0) if merging else 0.0
    names = _doubles(view, live)
    out = _footprint(view, names)
    out.update(doubles=len(names), merge_s=round(settled, 1),
               ksmd_core_ms=round(1000 * (ksm.ksmd_cpu_seconds() - c0)))
    return out


def memory_per_double(mode: str, mb: int = 100, log=print, timeout: float = 120) -> list[dict]:
    """Rows for one KSM mode (`off` / `on`) on a throw-away daemon of its own."""
    from deltabox.testing import ThrowawayDaemon
    rows: list[dict] = []
    ksm0 = ksm.read_state() if ksm.HAS_KSM else None
    daemon = ThrowawayDaemon(extra_args=("--ksm", mode, "--double-policy", "always",
                                         "--hot-checkpoints", "1", "--hottest-pool", "1"),
                             image_dirs=(CACHE / "images",))
    try:
        daemon.start()
        view = DaemonView(daemon)
        with daemon.client() as client:
            client.import_image("demo", CACHE / "images" / "demo.tar")
            sbx = client.create("demo", name=f"mem-{mode}", memory=(mb + 512) * MiB)
            py = sbx.open_session("python", name="py")
            r = py.run(f"import os\nblob = os.urandom({mb} << 20)")
            if r.exit_code != 0:
                raise RuntimeError(f"python set-up failed: {r.stderr[-300:]!r}")
            live = view.cgroup_of(client.get(sbx.id).info.init_pid)
            merging = mode != "off"
            ckpt = sbx.checkpoint("mem", full=True, wait_ready=True)
            one = _steady(view, live, 1, merging, timeout)
            sandbox = _footprint(view, [live])
            log(f"  ksm {mode}: sandbox {sandbox}, 1 double {one}")
            client.warm(ckpt, 7, wait=True)
            eight = _steady(view, live, 8, merging, timeout)
            sandbox = _footprint(view, [live])  # it may have merged with its doubles
            log(f"  ksm {mode}: sandbox {sandbox}, 8 doubles {eight}")
            for n, d in ((1, one), (8, eight)):
                per = d["cgroup_mib"] / max(1, d["doubles"])
                rows.append({"op": f"memory per double ({n}, ksm {mode})", "rss_mb": mb,
                             "ksm": mode, **d, "sandbox_cgroup_mib": sandbox["cgroup_mib"],
                             "sandbox_pss_mib": sandbox["pss_mib"],
                             "per_double_cgroup_mib": round(per, 1)})
            sbx.destroy()
    finally:
        daemon.cleanup()
        if ksm0 is not None and mode == "on":  # the host's ksmd as it was (tests, benches)
            (ksm.KSM_DIR / "pages_to_scan").write_text(str(ksm0.pages_to_scan))
            (ksm.KSM_DIR / "run").write_text(str(ksm0.run))
    return rows


def memory_targets(doc: dict) -> list[dict]:
    """Issue 10's targets 4 (8 doubles <= 2 x one sandbox) and 10 (fork 16 cold <= 40
    core-ms per child; fork 64 pre-warmed <= 100 ms)."""
    out = []
    mem = {(r["ksm"], r["doubles"]): r for r in doc.get("memory", [])}
    base, on = mem.get(("off", 1)), mem.get(("on", 8))
    if base and on:
        one = base["sandbox_cgroup_mib"]
        worst = max(on["cgroup_mib"], on["pss_mib"])
        out.append(target("8 doubles of a 100 MB sandbox (ksm on) <= 2 x one sandbox",
                          "<= 2.0", round(worst / one, 2),
                          f"8 doubles: cgroup {on['cgroup_mib']} MiB, Pss {on['pss_mib']} MiB; "
                          f"one sandbox (no KSM) {one} MiB; merged in {on['merge_s']} s, "
                          f"ksmd {on['ksmd_core_ms']} core-ms", worst <= 2 * one))
    for r in doc.get("results", []):
        if r["op"] == "fork 16 (cold)" and r.get("fork_core_ms"):
            v = round(r["fork_core_ms"]["p50"] / 16, 1)
            out.append(target(f"fork 16 cold, own CPU per child ({r['rss_mb']} MB)",
                              "<= 40 core-ms", v, "p50 of the fork's own CPU / 16", v <= 40))
        if r["op"] == "fork 64 (pre-warmed)":
            v = r["grpc_ms"]["p50"]
            out.append(target(f"fork 64 pre-warmed ({r['rss_mb']} MB)", "<= 100 ms", v,
                              "client p50, Warm(64, wait) before", v <= 100))
    return out


def render_memory(doc: dict, console) -> None:
    from rich.table import Table
    if not doc.get("memory"):
        return
    t = Table("operation", "RSS MB", "doubles", "cgroup MiB", "per double MiB", "Pss MiB",
              "merged pages", "merge s", "ksmd core-ms", "sandbox cgroup / Pss MiB",
              title="memory per double (cgroup: what the warm budget counts)", box=None,
              header_style="bold")
    for r in doc["memory"]:
        t.add_row(r["op"], str(r["rss_mb"]), str(r["doubles"]), f"{r['cgroup_mib']:.1f}",
                  f"{r['per_double_cgroup_mib']:.1f}", f"{r['pss_mib']:.1f}",
                  f"{r['ksm_merging_pages']:,}", f"{r['merge_s']:.1f}",
                  str(r["ksmd_core_ms"]),
                  f"{r['sandbox_cgroup_mib']:.0f} / {r['sandbox_pss_mib']:.0f}")
    console.print(t)


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    out = [r for m in ("off", "on") for r in memory_per_double(m, size, log=lambda s: print(
        s, file=sys.stderr))]
    print(json.dumps(out, indent=2))
