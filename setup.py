"""Builds the generated and native parts (native/build.py) into wheels as well.

The generated gRPC code is always built. The native parts (the cffi extension and the static
sandbox init) are built when a C compiler and cffi are present, else skipped with a warning:
the client needs neither, and the daemon refuses to start without them, naming the fix.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _native_build():
    spec = importlib.util.spec_from_file_location(
        "deltabox_native_build", Path(__file__).parent / "native" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithNative(build_py):
    def run(self):
        super().run()
        _native_build().build_all(Path(self.build_lib).resolve() / "deltabox",
                                  native_optional=True)


setup(cmdclass={"build_py": BuildWithNative})
