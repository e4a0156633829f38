"""Who imports whom: the layout rules of docs/layout.md, held by reading every module's imports (ast).

A module's *place* is its top-level package (`model/settings.py` -> model) or, for a top-level
module, its own name (`train.py` -> train); `tests/bench/` is a place of its own. `RULES` says,
for each place, the places it may import besides itself. Third-party imports are free. Every
import counts, wherever it is written (a function's local import too); a name given to importlib
as a string is not read. The rules have no cycle, so the code, held to them, has no package cycle.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The library: what the entry points, the scripts, the benchmarks and the tests compose.
LIBRARY = {"startup", "constants", "errors", "patches", "model", "data", "config", "run", "fixtures", "cli", "cli_help"}
# place -> the places it may import (itself always; third-party packages always).
RULES: dict[str, set[str]] = {
    "startup": set(),  # imported first by the entry points: quiets a library notice, imports nothing of ours
    "constants": set(),
    "errors": set(),
    "patches": {"errors", "constants"},  # the private internals of libraries, nothing of ours
    # What data needs of the model (tokenizer or processor, image-token count and id) is an
    # argument, not an import, and the other way round.
    "model": {"patches", "errors", "constants"},
    "data": {"patches", "errors", "constants"},
    "config": {"model", "patches", "errors", "constants"},  # model/settings.py is the manifest's schema
    "run": {"model", "data", "config", "patches", "errors", "constants"},
    "fixtures": {"model", "data", "errors", "constants"},  # seeded tiny bases and data sets
    "cli_help": {"patches", "errors", "constants"},  # told the settings' classes, never imports them
    "cli": {"cli_help", "config", "model", "patches", "errors", "constants"},
    # The entry points compose the library; nothing imports them (the tests excepted).
    "train": LIBRARY,
    "infer": LIBRARY,
    "scripts": LIBRARY,
    "bench": LIBRARY,  # every benchmark; the core never imports it
    "tests": LIBRARY | {"train", "infer", "scripts"},
    "tests/bench": LIBRARY | {"train", "infer", "scripts", "bench"},
}
SKIPPED_FOLDERS = {"outputs", "wandb", "runs", "docs", "configs", "__pycache__"}


@dataclass(frozen=True)
class Violation:
    module: str  # dotted, as Python names it: model.freeze
    imported: str  # the imported module: data.records
    line: int
    place: str

    def __str__(self) -> str:
        allowed = ", ".join(sorted(RULES[self.place])) or "nothing of this repo"
        return f"{self.module} imports {self.imported} (line {self.line}): {self.place} may import {allowed}"


def python_files(root: str) -> list[str]:
    """Every .py file under root, relative to it, less hidden and generated folders."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")) and d not in SKIPPED_FOLDERS)
        found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files) if f.endswith(".py")]
    return found


def module_name(path: str) -> str:
    parts = path[: -len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def place_of(path: str) -> str:
    parts = path.split(os.sep)
    if parts[0] == "tests" and len(parts) > 2 and parts[1] == "bench":
        return "tests/bench"
    return parts[0][: -len(".py")] if len(parts) == 1 else parts[0]


def local_places(root: str) -> set[str]:
    """The names an import can reach in this repo: top-level modules and packages."""
    return {place_of(path).split("/")[0] for path in python_files(root)} - {"tests"}


def imports_of(source: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in a module's source; relative ones are the
    module's own package's and are left out."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def unruled_places(root: str) -> set[str]:
    return {place_of(path) for path in python_files(root)} - set(RULES)


def violations(root: str) -> list[Violation]:
    """Every import of a module of this repo that its place's rule does not allow."""
    ours = local_places(root)
    found = []
    for path in python_files(root):
        place = place_of(path)
        with open(os.path.join(root, path)) as f:
            imports = imports_of(f.read())
        for name, line in imports:
            target = name.split(".")[0]
            if target in ours and target != place and target not in RULES.get(place, set()):
                found.append(Violation(module_name(path), name, line, place))
    return found


def rule_cycles() -> list[list[str]]:
    """Cycles among the places the rules let import each other (a place importing itself aside)."""
    cycles, done = [], set()

    def visit(place: str, path: list[str]) -> None:
        if place in path:
            cycles.append(path[path.index(place):] + [place])
            return
        if place in done:
            return
        for other in sorted(RULES.get(place, set()) - {place}):
            visit(other, path + [place])
        done.add(place)

    for place in sorted(RULES):
        visit(place, [])
    return cycles


def test_every_import_of_the_repo_follows_the_rules():
    found = violations(REPO_ROOT)
    assert not found, "\n".join(map(str, found))


def test_every_place_of_the_repo_has_a_rule():
    # A new top-level module or package says whom it may import before it lands.
    assert unruled_places(REPO_ROOT) == set()


def test_the_rules_allow_no_package_cycle():
    assert rule_cycles() == []


def test_nothing_but_the_benchmarks_and_their_tests_may_import_bench():
    assert [place for place, allowed in RULES.items() if "bench" in allowed] == ["tests/bench"]


def write_tree(root, files: dict[str, str]) -> str:
    for path, source in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(source)
    return str(root)


def test_a_violation_is_reported_by_module_and_import(tmp_path):
    root = write_tree(tmp_path, {
        "model/__init__.py": "",
        "model/freeze.py": "import torch\nfrom errors import UserError\n\n\ndef f():\n    from data.records import DataError\n",
        "data/records.py": "from data.formats import x\n",
        "errors.py": "",
        "train.py": "from model.freeze import f\nfrom data.records import DataError\n",
        "tests/test_x.py": "import train\nimport bench.measure\n",
        "tests/bench/test_y.py": "import bench.measure\n",
        "bench/measure.py": "import model.freeze\n",
        "scripts/tool.py": "import infer\n",
        "infer.py": "",
    })
    found = violations(root)
    assert [(v.module, v.imported, v.line) for v in found] == [
        ("model.freeze", "data.records", 6),  # a function's local import counts too
        ("scripts.tool", "infer", 1),
        ("tests.test_x", "bench.measure", 2),
    ]
    assert "model.freeze imports data.records (line 6): model may import constants, errors, patches" == str(found[0])


def test_a_new_place_without_a_rule_is_reported(tmp_path):
    root = write_tree(tmp_path, {"helpers_of_mine.py": "", "model/vision.py": ""})
    assert unruled_places(root) == {"helpers_of_mine"}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import a.b, c", [("a.b", 1), ("c", 1)]),
        ("from a.b import c", [("a.b", 1)]),
        ("from . import c\nfrom .d import e", []),
        ("if True:\n    import a", [("a", 2)]),
    ],
)
def test_imports_are_read_as_python_resolves_them(source, expected):
    assert imports_of(source) == expected
