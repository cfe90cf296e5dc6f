"""`deltabox bench`: benchmarks on a throw-away daemon (as root), each against what users
do today, measured in the same run with the same number of samples.

- `deltabox bench fs` (`fs.py`): DeltaFS checkpoint, rollback and fork over real source
  trees (`trees.py`) vs `shutil.copytree`, `cp -a --reflink=always` and tar;
  verdicts and tables in `fs_report.py`.
- `deltabox bench cr` (`cr.py`): DeltaCR full checkpoints, rollback (body double,
  right after a checkpoint, CRIU restore) and fork at 10/100/1000 MB of Python state vs
  plain `criu dump` / `criu restore` + a copy of the changed files (`cr_baseline.py`),
  and a whole-root copytree as a second, labelled baseline; verdicts in `cr_report.py`.
- `deltabox bench tree` (`tree.py`): DeltaCR as tree search and RL use it -- rollback to a
  random one of the last 8 checkpoints, back-to-back rollbacks, a rollback right after a
  checkpoint -- with the path mix, against plain CRIU restore in the same run; `--busy N`:
  rollbacks to 8 hot checkpoints and the gRPC floor (p50/p95/p99) with N other sandboxes
  idle, then busy (their own CPU/IO loop; exec, checkpoints, rollbacks from a client process).
- `deltabox bench rl` (`rl.py`): an RL rollout -- exec + full checkpoint per step, 20 %
  of steps roll back -- its CPU core-ms per step under each double policy against plain
  CRIU's in the same run, path mix, step latency, the first exec after a rollback.
- `deltabox bench ray` (`ray.py`): deltabox.ray's per-call overhead (pool handle vs the
  plain client vs an actor hop), fork on a node vs across nodes, and N sandboxes over a
  Ray cluster's nodes (create, step, checkpoint, rollback p50/p99; batched per node).
- `deltabox bench nonblocking` (`nonblocking.py`): Checkpoint(FULL)'s time to the reply
  with and without `background`, and until WaitCheckpoint returns, default and --durable.
- `common.py`: the daemon (`deltabox.testing.ThrowawayDaemon`), RPC timing, samples;
  `report.py`: target rows and the shared tables. Percentiles: `deltabox.stats`.

Targets are judged on what the client sees (gRPC p50 through `deltabox.Client`) at the
worst cell, with the daemon's own time beside it.
"""

from __future__ import annotations

from deltabox.bench.cr import main_cr
from deltabox.bench.fs import main_fs
from deltabox.bench.tree import main_tree
from deltabox.bench.trees import TREES

__all__ = ["main_fs", "main_cr", "main_tree", "TREES"]
