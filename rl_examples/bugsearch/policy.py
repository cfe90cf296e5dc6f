"""The scripted policy: where the fault is, and which one-line edits to try first.

A stand-in for a model, kept honest: it sees only what an agent would see -- the node's
source text and the names of the failing tests -- never the injected bug.

Fault localisation: the failing tests name functions (doctest `more_itertools.more.X`,
class `XTests`); a function is ranked by how many of the other failing functions call
it (`adjacent`, `locate` and `replace` all call `windowed`), then by its own failures.
Edits: classic mutation operators on each code line of the ranked functions (docstring
and comments skipped): comparison flips, +/- 1 on names and literals, 0/1 constants,
min/max and and/or swaps. Each edit has a prior weight (off-by-one and comparison edits
first, as a model's would be); the order is the weight times seeded noise, so two seeds
search the same tree in a different order, and one seed always the same way.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from dataclasses import dataclass

NAME = r"[A-Za-z_]\w*"
# (pattern, replacements, prior weight)
OPERATORS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    (r"<=", ("<",), 3.0), (r"(?<![<>=!])<(?![<=])", ("<=",), 3.0),
    (r">=", (">",), 3.0), (r"(?<![<>=!-])>(?![>=])", (">=",), 3.0),
    (r"==", ("!=",), 2.0), (r"!=", ("==",), 2.0),
    (r" - 1\b", ("", " + 1"), 2.5), (r" \+ 1\b", ("", " - 1"), 2.5),
    (rf"(?<![\w.'\"])({NAME})(?=\s*[,)\]])", (r"\1 - 1", r"\1 + 1"), 1.5),
    (r"(?<![\w.])0(?![\w.])", ("1",), 1.0), (r"(?<![\w.])1(?![\w.])", ("0", "2"), 1.0),
    (r"\bmin\(", ("max(",), 1.0), (r"\bmax\(", ("min(",), 1.0),
    (r" and ", (" or ",), 1.0), (r" or ", (" and ",), 1.0),
)
STRINGS = re.compile(r"'[^']*'|\"[^\"]*\"")
KEYWORDS = {"None", "True", "False", "not", "in", "is", "and", "or", "lambda", "if", "else"}


@dataclass(frozen=True)
class Edit:
    lineno: int
    old: str
    new: str
    what: str       # e.g. "windowed:913 '<=' -> '<'"
    prior: float

    def apply(self, text: str) -> str:
        lines = text.splitlines(True)
        assert lines[self.lineno - 1] == self.old
        lines[self.lineno - 1] = self.new
        return "".join(lines)


def suspects(failed_units: list[str], text: str) -> list[str]:
    """Functions named by the failing tests, most-called-by-the-others first."""
    named: dict[str, int] = {}
    for unit in failed_units:
        last = unit.rsplit(".", 1)[-1]
        name = last if unit.startswith("doctest:") else \
            re.sub(r"(?<!^)([A-Z])", r"_\1", last.removesuffix("Tests")).lower()
        named[name] = named.get(name, 0) + 1
    funcs = {n.name: n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
    named = {n: c for n, c in named.items() if n in funcs}
    calls = {n: {c.func.id for c in ast.walk(funcs[n]) if isinstance(c, ast.Call)
                 and isinstance(c.func, ast.Name)} for n in named}
    callers = {n: sum(n in calls[m] for m in named if m != n) for n in named}
    return sorted(named, key=lambda n: (-callers[n], -named[n], n))


def _code_lines(text: str, function: str) -> list[int]:
    node = next(n for n in ast.parse(text).body
                if isinstance(n, ast.FunctionDef) and n.name == function)
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]   # the docstring
    return list(range(body[0].lineno, node.end_lineno + 1)) if body else []


def candidates(text: str, functions: list[str], seed: int) -> list[Edit]:
    """Every one-line edit of the ranked functions, in the policy's order (suspect rank
    first, then prior x noise seeded by `seed` and the node's text)."""
    lines = text.splitlines(True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    rng = random.Random(f"{seed}:{digest}")
    ranked: list[tuple[int, float, Edit]] = []
    seen: set[tuple[int, str]] = set()
    for rank, function in enumerate(functions):
        for lineno in _code_lines(text, function):
            line = lines[lineno - 1]
            code, hash_, comment = line.partition("#")
            if not code.strip():
                continue
            # string literals are masked: an edit never lands inside one
            masked = STRINGS.sub(lambda m: "\0" * len(m.group(0)), code)
            for pattern, replacements, prior in OPERATORS:
                for m in re.finditer(pattern, masked):
                    if m.groups() and m.group(1) in KEYWORDS:
                        continue
                    for rep in replacements:
                        new_code = code[:m.start()] + m.expand(rep) + code[m.end():]
                        new = new_code + hash_ + comment
                        if new == line or (lineno, new) in seen:
                            continue
                        seen.add((lineno, new))
                        what = (f"{function}:{lineno}:{m.start()} {m.group(0).strip()!r} -> "
                                f"{m.expand(rep).strip()!r}")
                        edit = Edit(lineno, line, new, what, prior)
                        ranked.append((rank, -prior * rng.uniform(0.5, 1.5), edit))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [e for _, _, e in ranked]
