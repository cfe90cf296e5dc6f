"""The generated API reference (docs/api.md) matches the docstrings it is generated from."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "native" / "gen_api_docs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + "\n(regenerate: python native/gen_api_docs.py)"
