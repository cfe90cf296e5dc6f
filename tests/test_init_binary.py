"""The sandbox init on its own (native/init/test_init.py): namespaces, mounts,
the control protocol, ptys, CRIU, symlinks planted before a launch and the /proc
masks, exercised against the binary the daemon runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deltabox.config import init_binary

TEST_INIT = Path(__file__).resolve().parent.parent / "native" / "init" / "test_init.py"


def test_init_binary_battery():
    res = subprocess.run([sys.executable, str(TEST_INIT), str(init_binary())],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "FAIL" not in res.stdout, res.stdout
