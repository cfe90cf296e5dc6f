"""Background checkpoints: `deltabox bench nonblocking` (issue 10, target 7).

How long a caller waits for `Checkpoint(FULL)` with and without `background`, through
`deltabox.Client`, on one throw-away daemon per durability setting (default: SQLite
NORMAL, no syncfs; `--durable`: each commit fsynced and each new layer syncfs'ed, the
work that background recording takes off the reply). The sandbox: the demo image, a
Python session holding a few MB, a small project tree (files rewritten before each
checkpoint, so each one sinks a layer). Per sample: the time to the reply, and for
background ones the time until `WaitCheckpoint` returns (the checkpoint recorded).
Foreground and background checkpoints alternate, so both see the same host load.

    deltabox bench nonblocking [-n 30] [--mb 8] [--files 200] [--json]
"""

from __future__ import annotations

import json
import sys
import time

from deltabox.bench.common import CACHE
from deltabox.stats import summary
from deltabox.testing import ThrowawayDaemon

__all__ = ["measure", "main_nonblocking"]

PROJECT = ("import os\n"
           "for i in range({files}):\n"
           "    d = f'/work/proj/pkg{{i % 10}}'\n"
           "    os.makedirs(d, exist_ok=True)\n"
           "    open(f'{{d}}/m{{i}}.py', 'w').write(f'x = {{i}}\\n' * 40)\n")


def measure(durable: bool, n: int, mb: int, files: int, log) -> dict:
    args = ("--no-standby",) + (("--durable",) if durable else ())
    rows: dict[str, list[float]] = {}
    with ThrowawayDaemon(extra_args=args) as d, d.client() as c:
        c.import_image("demo", CACHE / "images" / "demo.tar")
        s = c.create("demo", name="nb", memory=(mb + 512) << 20)
        py = s.open_session("python", name="py")
        py.run(f"import os\nblob = os.urandom({mb} << 20)\nstep = 0")
        s.exec(["python3", "-c", PROJECT.format(files=files)], timeout=60)
        for i in range(n):
            for background in (False, True):
                py.run("step += 1")
                s.write_file(f"/work/proj/step{i % 5}.txt", f"{i} {background}\n" * 100)
                t0 = time.perf_counter()
                info = s.checkpoint(f"c{i}", full=True, background=background)
                reply = 1000 * (time.perf_counter() - t0)
                key = "background" if background else "foreground"
                rows.setdefault(f"{key}_reply_ms", []).append(reply)
                if background:
                    done = c.wait_checkpoint(info)
                    rows.setdefault("background_recorded_ms", []).append(
                        1000 * (time.perf_counter() - t0))
                    rows.setdefault("background_pending_at_reply", []).append(
                        float(info.pending))
                    rows.setdefault("background_commit_ms", []).append(
                        done.timings_ms.get("commit_ms", 0.0))
                else:
                    rows.setdefault("foreground_commit_ms", []).append(
                        info.timings_ms.get("commit_ms", 0.0))
                rows.setdefault(f"{key}_frozen_ms", []).append(
                    info.timings_ms.get("frozen_ms", 0.0))
            log(f"{'durable' if durable else 'default'} #{i}: foreground "
                f"{rows['foreground_reply_ms'][-1]:.1f} ms, background reply "
                f"{rows['background_reply_ms'][-1]:.1f} ms, recorded "
                f"{rows['background_recorded_ms'][-1]:.1f} ms")
        s.destroy()
    return {"durable": durable, "n": n, "mb": mb, "files": files,
            **{k: summary(v) for k, v in rows.items()}}


def main_nonblocking(args) -> int:
    n = args.iterations or 30
    results = [measure(durable, n, args.mb, args.files, lambda m: print(m, file=sys.stderr))
               for durable in (False, True)]
    if getattr(args, "json", False):
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(f"\n{'--durable' if r['durable'] else 'default'}: {r['n']} full checkpoints "
              f"each way, {r['mb']} MB, {r['files']} files   p50 / p95 (ms)")
        for k, v in r.items():
            if isinstance(v, dict) and "p50" in v:
                print(f"  {k:32s} {v['p50']:9.2f} {v['p95']:9.2f}")
    return 0
