"""The test runner that runs INSIDE the sandbox (python3 of the demo image, stdlib only).

One search node = `step(request)`: check that the project file is the parent node's
(its SHA256, and in a persistent session the session's own record of the node it is
at: a rollback that did not bring the files -- or the processes -- back fails here,
loudly), apply the node's edit (one line replaced), re-import the project and run the
selected tests; reply with the new file's SHA256 and the failures.

Two ways to call it, the same code:
  * in a persistent Python session (`import bugsearch_runner as R; R.step({...})`):
    the interpreter, unittest and the project's untouched imports stay loaded, the
    edited package is re-imported;
  * as a process (`python3 bugsearch_runner.py '{...}'`), after an fs rollback has
    left no process behind: a cold interpreter per node.
`full_suite(request)` runs the whole suite (unittest discovery, doctests included):
at the root to localise the fault, at the end to verify the fix.
Requests and replies are JSON; a reply's "error" says what did not match.
"""

import doctest
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
import unittest

HERE = {"node": None}   # the node this process is at: rolled back with the session


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _unit(test):
    """What a failure selects again: the TestCase class, or the doctest by name."""
    test = getattr(test, "test_case", test)   # a subTest's case
    if isinstance(test, doctest.DocTestCase):
        return "doctest:" + test.id()
    return f"{type(test).__module__}.{type(test).__qualname__}"


class _NamedDocTests(doctest.DocTestFinder):
    """The doctests of the named functions of a module only (not the whole module's,
    which would parse every docstring of it)."""

    def __init__(self, names):
        super().__init__()
        self.names = names

    def find(self, module, name=None, globs=None, extraglobs=None):
        found = []
        for n in self.names:
            found += super().find(getattr(module, n), f"{module.__name__}.{n}",
                                  module=module, globs=globs, extraglobs=extraglobs)
        return found


def _suite(selection):
    suite = unittest.TestSuite()
    doctests = {}
    for sel in selection:
        if sel.startswith("doctest:"):
            module, _, name = sel[len("doctest:"):].rpartition(".")
            doctests.setdefault(module, []).append(name)
        else:
            suite.addTests(unittest.defaultTestLoader.loadTestsFromName(sel))
    for module, names in doctests.items():
        suite.addTests(doctest.DocTestSuite(importlib.import_module(module),
                                            test_finder=_NamedDocTests(names)))
    return suite


def _run(suite):
    result = unittest.TestResult()
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:   # doctests print on failure
        out, sys.stdout = sys.stdout, null
        try:
            suite.run(result)
        finally:
            sys.stdout = out
    failed = [t for t, _ in result.failures + result.errors]
    return {"ran": result.testsRun, "failures": len(failed),
            "failed": sorted({_unit(t) for t in failed}),
            "tests_ms": round(1000 * (time.perf_counter() - t0), 2)}


def step(req):
    """One node: verify the parent, apply the edit, re-import, run the selection."""
    path = os.path.join(req["root"], req["file"])
    found = _sha(path)
    if found != req["expect_sha"]:
        return {"error": f"file is not the parent's: sha {found[:12]}, expected "
                         f"{req['expect_sha'][:12]} (node {req['expect_node']})"}
    if req.get("check_session") and HERE["node"] != req["expect_node"]:
        return {"error": f"session is at node {HERE['node']}, expected {req['expect_node']}"}
    lineno, old, new = req["edit"]
    with open(path) as f:
        lines = f.readlines()
    if lines[lineno - 1] != old:
        return {"error": f"line {lineno} is {lines[lineno - 1]!r}, expected {old!r}"}
    lines[lineno - 1] = new
    with open(path, "w") as f:
        f.writelines(lines)
    HERE["node"] = req["node"]
    sha = _sha(path)
    # Its bytecode goes: an edit of the same size in the same second would look fresh.
    try:
        os.unlink(importlib.util.cache_from_source(path))
    except FileNotFoundError:
        pass
    try:
        _load(req)
        suite = _suite(req["selection"])
    except Exception as e:   # noqa: BLE001 - a SyntaxError, a NameError at import: broken
        return {"sha": sha, "broken": f"{type(e).__name__}: {e}"}
    return {"sha": sha, **_run(suite)}


def _load(req):
    """The edited module re-executed in place, and its package (whose `from .more
    import *` re-binds the names); the tests and every other module stay loaded --
    they reach the project through the package's attributes. A fresh process imports."""
    if req["root"] not in sys.path:
        sys.path.insert(0, req["root"])
    module = req["file"][:-len(".py")].replace("/", ".")
    if module in sys.modules:
        importlib.reload(sys.modules[module])
        package = module.rpartition(".")[0]
        if package in sys.modules:
            importlib.reload(sys.modules[package])
    else:
        importlib.import_module(module)


def full_suite(req):
    """The whole suite (discovery under tests/, doctests through load_tests)."""
    if req["root"] not in sys.path:
        sys.path.insert(0, req["root"])
    suite = unittest.defaultTestLoader.discover(os.path.join(req["root"], "tests"),
                                                top_level_dir=req["root"])
    return {"sha": _sha(os.path.join(req["root"], req["file"])), **_run(suite)}


def set_node(req):
    HERE["node"] = req["node"]
    return {"node": req["node"]}


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(globals()[request.get("call", "step")](request)))
