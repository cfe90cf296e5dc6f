"""A cold fork's own CPU per child, for one or more CRIU builds: `python -m deltabox.bench.fork_cpu`.

A micro-measure for issue 10 target 10 (fork 16 cold <= 40 core-ms per child) and for
comparing CRIU builds (docs/deltacr.md, "CRIU patches", 0007). For each round and each
`--criu-prefix` in turn (so the builds alternate and share the VM's moods), a throw-away
daemon with that CRIU (`--no-standby`: no doubles, no warm pool, every child is a CRIU
restore) imports the demo image, starts a sandbox whose Python session holds `--mb` MB,
takes a full checkpoint and forks it `-n` times into `--k` children, destroying them in
between. Per fork: the wall time through the client and the CPU of the daemon's
accounting cgroup over the call (daemon + CRIU + every sandbox process), per child.

    python -m deltabox.bench.fork_cpu --criu-prefix /opt/deltabox/criu /opt/other \\
        --rounds 3 -n 4 --k 16 [--mb 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from deltabox.bench.common import CACHE, DaemonView
from deltabox.stats import summary
from deltabox.testing import ThrowawayDaemon

__all__ = ["measure", "main"]


def measure(criu_prefix: str, mb: int, k: int, n: int) -> list[tuple[float, float]]:
    """n cold forks of k children on a daemon of its own: [(wall ms, core-ms per child)]."""
    out = []
    args = ("--no-standby",) + (("--criu-prefix", criu_prefix) if criu_prefix else ())
    with ThrowawayDaemon(extra_args=args, accounting=True) as d, d.client() as c:
        c.import_image("demo", CACHE / "images" / "demo.tar")
        sbx = c.create("demo", name="fork-cpu")
        sbx.open_session("bash", name="shell")
        r = sbx.open_session("python", name="py").run(
            f"import os\nblob = os.urandom({mb} << 20)\ncounter = 0")
        if r.exit_code != 0:
            raise RuntimeError(f"python set-up failed: {r.stderr[-500:]!r}")
        ckpt = sbx.checkpoint("head", full=True)
        view = DaemonView(d)
        settled = view.wait_idle  # the checkpoint's background work done, then each fork's
        if not settled():
            raise RuntimeError("the daemon did not go idle after the checkpoint within 30 s")
        for _ in range(n):
            c0, t0 = d.cpu_seconds(), time.perf_counter()
            children = c.fork(ckpt, k)
            wall = time.perf_counter() - t0
            own = 1000 * (d.cpu_seconds() - c0)
            live = [ch.sandbox for ch in children if ch.sandbox is not None]
            if len(live) != k:
                raise RuntimeError(f"{k - len(live)} of {k} children failed: "
                                   f"{[ch.error for ch in children if ch.sandbox is None]}")
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda s: s.destroy(), live))
            out.append((1000 * wall, own / k))
            if not settled():
                raise RuntimeError("the daemon did not go idle after a fork within 30 s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criu-prefix", nargs="+", default=[""],
                   help="CRIU install prefixes to compare (default: the daemon's own)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-n", type=int, default=4, help="forks per build per round")
    p.add_argument("--k", type=int, default=16, help="children per fork")
    p.add_argument("--mb", type=int, default=10, help="MB the Python session holds")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    samples: dict[str, list[tuple[float, float]]] = {pre: [] for pre in a.criu_prefix}
    for rnd in range(a.rounds):
        for pre in a.criu_prefix:
            got = measure(pre, a.mb, a.k, a.n)
            samples[pre] += got
            print(f"round {rnd} {pre or 'default'}: core-ms per child "
                  + " ".join(f"{x:.1f}" for _, x in got), file=sys.stderr, flush=True)
    doc = {pre or "default": {"wall_ms": summary([w for w, _ in s], 1),
                              "core_ms_per_child": summary([x for _, x in s], 1)}
           for pre, s in samples.items()}
    if a.json:
        json.dump({"k": a.k, "mb": a.mb, "rounds": a.rounds, "n": a.n, "builds": doc},
                  sys.stdout, indent=1)
    else:
        for pre, row in doc.items():
            print(f"{pre}: fork {a.k} cold, {a.mb} MB: core-ms per child "
                  f"p50 {row['core_ms_per_child']['p50']} (min {row['core_ms_per_child']['min']}"
                  f", max {row['core_ms_per_child']['max']}); wall p50 {row['wall_ms']['p50']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
