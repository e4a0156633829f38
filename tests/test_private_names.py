"""patches.py says it is the one place this repo touches a library's private internals; this file
holds it to that by reading every Python file of the repo (tests included: a test that reaches into
a library's internals breaks on an upgrade as surely as the code does).

A name is private when it starts with one underscore (dunders are public protocol). Reported:
1. a private import from a library: `from transformers.x import _y`, `import torch._dynamo`;
2. a private attribute of a name imported from a library: `TrainingArguments._setup_devices`,
   `trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`;
3. any other `obj._name` (or `getattr(obj, "_name")`) whose name this repo defines nowhere
   (`def _x`, `class _X`, `_x = ...`, `self._x = ...`): the scan cannot know `obj`'s type, and a
   private name the repo never defines belongs to someone else (`model._from_config`);
4. a method overriding a library class's private one (`def _save` in a `Trainer` subclass).
Exempt: the guarded modules (GUARDED) and the tests that pin what they touch (PINS).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import os
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = {
    "transformers", "peft", "accelerate", "torch", "trl", "datasets", "bitsandbytes",
    "deepspeed", "safetensors", "tokenizers", "huggingface_hub",
}
GUARDED = {"patches.py", "bench/patches.py"}  # the modules allowed to touch private names
PINS = {"tests/test_patches.py", "tests/test_bench_patches.py", "bench/tests/test_patches.py"}
# Underscored names the standard library documents as public (namedtuple's API, os._exit).
PUBLIC_BY_DOCUMENTATION = {"_replace", "_asdict", "_fields", "_make", "_field_defaults", "_exit"}
ATTRIBUTE_CALLS = {"getattr", "hasattr", "setattr", "delattr"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def python_files(root: str) -> dict[str, str]:
    """{path relative to root: source} of every .py file under root (hidden folders skipped)."""
    sources = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "outputs"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    sources[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return sources


def imported_names(tree: ast.AST) -> dict[str, str]:
    """{local name: dotted path it was imported as} for the file's absolute imports."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def resolve(dotted: str):
    """The object a dotted path names (`transformers.Trainer`), or None where it does not import."""
    parts = dotted.split(".") if dotted else []
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                value = getattr(value, part)
        except AttributeError:
            return None
        return value
    return None


def dotted_name(node: ast.AST, imports: dict[str, str], with_builtins: bool = False) -> str | None:
    """`nn.Module` -> "torch.nn.Module" through the file's imports; None if not an imported name."""
    if isinstance(node, ast.Name):
        return imports.get(node.id) or (node.id if with_builtins and hasattr(builtins, node.id) else None)
    if isinstance(node, ast.Attribute):
        head = dotted_name(node.value, imports, with_builtins)
        return f"{head}.{node.attr}" if head else None
    return None


def library_privates_overridden(cls: ast.ClassDef, imports: dict[str, str]) -> list[str]:
    """The methods of `cls` that override a private attribute some library class defines."""
    mro = []
    for base in cls.bases:
        resolved = resolve(dotted_name(base, imports, with_builtins=True) or "")
        mro += inspect.getmro(resolved) if isinstance(resolved, type) else []
    library_classes = [c for c in mro if c.__module__.split(".")[0] in LIBRARIES]
    return [
        node.name for node in cls.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and is_private(node.name)
        and any(node.name in vars(c) for c in library_classes)
    ]


def names_defined(tree: ast.AST, overrides: set[str]) -> set[str]:
    """Private names this file defines: functions, classes, assigned names, `self._x` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and is_self(node.value):
            names.add(node.attr)  # `self._x = ...`; `obj._x = ...` on someone else's object defines nothing
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if is_private(n)} - overrides


def private_uses(tree: ast.AST, imports: dict[str, str]):
    """(line, name, library path or None) for every private name the file reads or imports."""
    library = {local: path for local, path in imports.items() if path.split(".")[0] in LIBRARIES}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[0] in LIBRARIES:
                for alias in node.names:
                    dotted = f"{node.module}.{alias.name}"
                    if any(is_private(part) for part in dotted.split(".")):
                        yield node.lineno, dotted, dotted
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES and any(is_private(p) for p in alias.name.split(".")):
                    yield node.lineno, alias.name, alias.name
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            yield node.lineno, node.attr, dotted_name(node.value, library)
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTRIBUTE_CALLS
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str) and is_private(node.args[1].value)
        ):
            yield node.lineno, node.args[1].value, dotted_name(node.args[0], library)


def private_name_violations(sources: dict[str, str]) -> list[str]:
    """`path:line: what` for every private name of a library used outside GUARDED and PINS."""
    trees = {path: ast.parse(source, filename=path) for path, source in sources.items()}
    imports = {path: imported_names(tree) for path, tree in trees.items()}
    overrides = {
        path: {(node.lineno, name) for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
               for name in library_privates_overridden(node, imports[path])}
        for path, tree in trees.items() if path not in GUARDED
    }
    own = set()
    for path, tree in trees.items():
        if path not in GUARDED:
            own |= names_defined(tree, {name for _, name in overrides[path]})
    found = []
    for path, tree in trees.items():
        if path in GUARDED or path in PINS:
            continue
        found += [f"{path}:{line}: overrides a library's private method {name}" for line, name in sorted(overrides[path])]
        for line, name, library_path in private_uses(tree, imports[path]):
            if library_path is not None:
                found.append(f"{path}:{line}: {name} of {library_path}")
            elif name not in own and name not in PUBLIC_BY_DOCUMENTATION:
                found.append(f"{path}:{line}: {name}, a private name this repo never defines")
    return sorted(set(found))


def test_no_private_name_of_a_library_outside_patches():
    violations = private_name_violations(python_files(REPO_ROOT))
    assert violations == [], "move each behind a function in patches.py, with a test pinning it:\n" + "\n".join(violations)


VIOLATIONS = {
    "private attribute of an unknown object": ("model._from_config(config)", "_from_config"),
    "private attribute through getattr": ('getattr(TrainingArguments, "_VALID_DICT_FIELDS", ())', "_VALID_DICT_FIELDS"),
    "private attribute of an imported library name": ("trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = 4", "trl.trainer.utils"),
    "private import": ("from trl.kernels.chunked_logprob import _use_triton", "_use_triton"),
    "private module import": ("import torch._dynamo", "torch._dynamo"),
    "override of a private method": ("class Hooks(Trainer):\n    def _save(self, output_dir=None, state_dict=None): pass", "_save"),
    "override through an alias": ("class Net(nn.Module):\n    def _apply(self, fn, recurse=True): pass", "_apply"),
}
HEADER = "import trl.trainer.utils\nfrom torch import nn\nfrom transformers import Trainer, TrainingArguments\n"


@pytest.mark.parametrize("kind", VIOLATIONS)
def test_the_scan_reports_each_kind_of_private_use(kind):
    line, name = VIOLATIONS[kind]
    violations = private_name_violations({"model/thing.py": HEADER + line + "\n"})
    assert len(violations) == 1 and violations[0].startswith("model/thing.py:4:") and name in violations[0], violations


def test_the_scan_allows_what_the_repo_owns_and_what_patches_py_does():
    sources = {
        "model/own.py": textwrap.dedent("""
            from torch import nn

            def _helper():
                return 1

            class Block(nn.Module):
                def _merge(self):  # a private method of our own, overriding nothing of nn.Module
                    self._cache = _helper()
                    return self._cache
            """),
        "run/user.py": "from model.own import Block\n\nBlock()._merge()\nx = getattr(Block(), '_cache', None)\n",
        "patches.py": "from transformers import Trainer\n\nclass Hooks(Trainer):\n    def _save(self):\n        return self._load_from_checkpoint\n",
        "tests/test_patches.py": "from transformers import Trainer\n\nassert Trainer._save_checkpoint\n",
        "cli.py": "import collections\n\nPoint = collections.namedtuple('Point', 'x y')\nPoint(1, 2)._replace(x=3)\n",
    }
    assert private_name_violations(sources) == []


def test_a_name_defined_only_in_patches_py_is_still_reported_elsewhere():
    # patches.py's own overrides (`_save`) are library names, not the repo's: elsewhere they count.
    sources = {
        "patches.py": "from transformers import Trainer\n\nclass Hooks(Trainer):\n    def _save(self):\n        pass\n",
        "run/trainer.py": "def save(trainer):\n    trainer._save('out')\n",
    }
    assert private_name_violations(sources) == ["run/trainer.py:2: _save, a private name this repo never defines"]
