"""Where a full checkpoint's time goes: `python -m deltabox.bench.cr_phases`.

A micro-measure for issue 10 target 5 (docs/deltacr.md, "Where a full checkpoint's time
goes"). On a throw-away daemon (no body doubles: `--standby false`, so only the checkpoint
itself is charged), one demo-image sandbox whose Python session holds X MB takes N full
checkpoints, one agent step (the shell appends to a file, Python bumps a counter) before
each. Per checkpoint it reads:

* through the client: the call's wall time and the daemon's timings_ms (frozen_ms and its
  phases: freeze, dump, sink, thaw);
* CRIU's own stats-dump image (`criu/stats.c`: freezing, frozen, memdump, memwrite time
  and pages) from the checkpoint's images dir;
* CPU (core-ms): the daemon's accounting cgroup (daemon + CRIU + sandboxes) over the call
  and the background work it starts (image deduplication), minus the idle rate measured
  over as long a pause.

In the same run, the baseline: a plain `criu dump --leave-running` (CLI) of the same tree,
its wall time and CPU (its own children's rusage).

    python -m deltabox.bench.cr_phases --mb 10 100 -n 20 [--json] [--criu-prefix DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from deltabox.bench.common import CACHE
from deltabox.host.criu import find_criu
from deltabox.stats import summary
from deltabox.testing import ThrowawayDaemon

__all__ = ["read_dump_stats", "main"]

# criu/images/stats.proto, dump_stats_entry: field number -> name (times in us).
_DUMP_FIELDS = {1: "freezing_us", 2: "frozen_us", 3: "memdump_us", 4: "memwrite_us",
                5: "pages_scanned", 6: "pages_skipped_parent", 7: "pages_written",
                8: "irmap_resolve_us", 9: "pages_lazy", 10: "page_pipes",
                11: "page_pipe_bufs"}
_MAGICS = (0x54564319, 0x55105940)  # IMG_COMMON, IMG_SERVICE: a second magic follows


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> dict[int, object]:
    """A protobuf message's top-level fields (varints and length-delimited only)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            out[num], i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            out[num], i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def read_dump_stats(images: Path) -> dict[str, int]:
    """CRIU's stats-dump image of a dump, decoded ({} if there is none)."""
    try:
        raw = (images / "stats-dump").read_bytes()
    except OSError:
        return {}
    i = 4
    if struct.unpack_from("<I", raw, 0)[0] in _MAGICS:
        i = 8
    size = struct.unpack_from("<I", raw, i)[0]
    entry = _fields(raw[i + 4:i + 4 + size])
    dump = _fields(entry.get(1, b""))
    return {name: int(dump[num]) for num, name in _DUMP_FIELDS.items() if num in dump}


def _plain_dump(criu: Path, pid: int, work: Path, i: int) -> tuple[float, float]:
    """(ms, CPU core-ms) of `criu dump --leave-running` of the tree, as the bench's
    baseline runs it (cr_baseline.py)."""
    img = work / f"plain-{i}"
    img.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([str(criu), "dump", "-t", str(pid), "-D", str(img), "-o", "dump.log",
                        "--root", f"/proc/{pid}/root", "--external", "mnt[/]:root",
                        "--leave-running", "--network-lock", "skip", "--link-remap",
                        "--tcp-established", "--file-locks", "--manage-cgroups=ignore"],
                       capture_output=True)
    ms = 1000 * (time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"plain criu dump failed: {(img / 'dump.log').read_text()[-800:]}")
    shutil.rmtree(img)
    cpu = 1000 * ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return ms, cpu


def _idle_cpu_rate(d: ThrowawayDaemon, seconds: float = 1.0) -> float:
    c0, t0 = d.cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (d.cpu_seconds() - c0) / (time.perf_counter() - t0)


def measure(mb: int, n: int, log, criu_prefix: str = "") -> dict:
    criu = find_criu()  # the baseline: the host's CRIU, as a user has it
    args = ("--no-standby",) + (("--criu-prefix", criu_prefix) if criu_prefix else ())
    with ThrowawayDaemon(extra_args=args, accounting=True) as d:
        with d.client() as c:
            c.import_image("demo", CACHE / "images" / "demo.tar")
            sbx = c.create("demo", name=f"ph-{mb}", memory=(mb + 512) << 20)
            sh = sbx.open_session("bash", name="shell")
            py = sbx.open_session("python", name="py")
            py.run(f"import os\nblob = os.urandom({mb} << 20)\ncounter = 0")
            sh.run("cd /root")
            pid = c.get(sbx.id).info.init_pid
            work = d.state_dir / "plain"
            rows: dict[str, list[float]] = {}
            idle = _idle_cpu_rate(d)
            for i in range(n):
                sh.run(f'echo "step {i}" >> /root/notes.txt')
                py.run("counter += 1")
                time.sleep(0.2)
                c0 = d.cpu_seconds()
                t0 = time.perf_counter()
                info = sbx.checkpoint(f"c{i}", full=True)
                wall = time.perf_counter() - t0
                time.sleep(0.3)  # the deduplication it starts
                cpu = 1000 * (d.cpu_seconds() - c0 - idle * (time.perf_counter() - t0))
                sample = {"wall_ms": 1000 * wall, "cpu_core_ms": cpu,
                          **{k: v for k, v in info.timings_ms.items()},
                          **{f"criu_{k}": v for k, v in read_dump_stats(
                              d.state_dir / "store" / "images" / info.id).items()}}
                try:  # did CRIU load its kernel-feature cache? (said at log level >= 3 only)
                    clog = (d.state_dir / "store" / "images" / info.id / "criu.log").read_text()
                    if "Version:" in clog:
                        sample["kdat_cache_loaded"] = float("Loaded kdat cache" in clog)
                except OSError:
                    pass
                for k, v in sample.items():
                    rows.setdefault(k, []).append(float(v))
                pms, pcpu = _plain_dump(criu, pid, work, i)
                rows.setdefault("plain_dump_ms", []).append(pms)
                rows.setdefault("plain_dump_cpu_core_ms", []).append(pcpu)
                log(f"{mb} MB #{i}: frozen {info.timings_ms.get('frozen_ms', 0):.1f} ms, "
                    f"cpu {cpu:.0f} core-ms; plain dump {pms:.1f} ms")
            sbx.destroy()
    return {"rss_mb": mb, "n": n, **{k: summary(v) for k, v in rows.items()},
            "samples": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deltabox.bench.cr_phases",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, nargs="+", default=[10, 100])
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--criu-prefix", default="", help="the daemon's CRIU (e.g. a patched "
                   "build); the plain-dump baseline keeps the host's")
    a = p.parse_args(argv)
    results = [measure(mb, a.n, lambda m: print(m, file=sys.stderr), a.criu_prefix)
               for mb in a.mb]
    if a.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(f"\n{r['rss_mb']} MB, {r['n']} checkpoints: p50 / p95")
        for k, v in r.items():
            if isinstance(v, dict) and "p50" in v:
                print(f"  {k:28s} {v.get('p50', 0):10.1f} {v.get('p95', 0):10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
