"""The task of the adapter examples (skyrl_example.py, openenv_example.py), and their baseline.

The task, a tiny SWE task: /work/add.sh subtracts where it should add; solved when
`sh /work/add.sh 2 3` prints 5. Beside it the setup writes a workspace of `files` small
files (/work/src), standing in for the repository checkout a real SWE task starts from
(a real one also installs dependencies: its setup costs seconds to minutes).

The baseline is what a trainer does without checkpoints (one container per trajectory or
session, as OpenEnv's Docker provider and most SkyRL SWE setups do): n fresh sandboxes,
created and set up concurrently, timed until each is ready -- the same client, daemon and
image as the forks it is compared with.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

TEST = "test \"$(sh /work/add.sh 2 3)\" = 5"


def setup_script(files: int = 0) -> str:
    """The task's setup, a shell script: add.sh, and `files` files under /work/src."""
    return ("mkdir -p /work/src && printf '#!/bin/sh\\necho $(( $1 - $2 ))\\n' > /work/add.sh "
            "&& chmod +x /work/add.sh && i=0 && "
            f"while [ $i -lt {int(files)} ]; do "
            "echo \"def f$i(x): return x + $i\" > /work/src/m$i.py; i=$((i + 1)); done")


def setup(sbx, files: int = 0) -> None:
    sbx.exec(["/bin/sh", "-c", setup_script(files)], timeout=600).check()


def fresh_sandboxes_ms(client, n: int, files: int = 0, image: str = "tiny") -> list[float]:
    """n new sandboxes of `image`, created and set up concurrently: for each, the
    milliseconds from the common start until it was ready (then all are destroyed,
    untimed). A group is ready at the max."""
    t0 = time.perf_counter()

    def one():
        sbx = client.create(image)
        setup(sbx, files)
        return sbx, (time.perf_counter() - t0) * 1e3

    with ThreadPoolExecutor(n) as pool:
        made = list(pool.map(lambda _: one(), range(n)))
    for sbx, _ in made:
        sbx.destroy()
    return [ms for _, ms in made]
