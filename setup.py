"""Builds the generated and native parts (native/build.py) into wheels as well.

The generated gRPC code is always built. The native parts (the cffi extension and the static
sandbox init) are built when a C compiler and cffi are present, else skipped with a warning:
the client needs neither, and the daemon refuses to start without them, naming the fix.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
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


class WheelTaggedByWhatWasBuilt(bdist_wheel):
    """A wheel with the native parts holds a CPython extension and a static x86_64 (or
    aarch64) binary: tag it for this interpreter and platform (cp311-cp311-linux_x86_64),
    so pip never installs it where it cannot run. A client-only wheel (no compiler: the
    native parts were skipped) stays py3-none-any. setuptools decides the tag before the
    build; the build is run first here (it runs once), then the tag is decided by its
    result."""

    def run(self):
        if not self.skip_build:
            self.run_command("build")
        build_lib = Path(self.get_finalized_command("build_py").build_lib)
        native = any((build_lib / "deltabox").glob("_native*.so"))
        self.root_is_pure = not native
        if native:   # install then puts the package in platlib, the wheel's root
            self.distribution.has_ext_modules = lambda: True
        super().run()


setup(cmdclass={"build_py": BuildWithNative, "bdist_wheel": WheelTaggedByWhatWasBuilt})
