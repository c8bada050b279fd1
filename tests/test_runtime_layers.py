"""The runtime package is layered: each module imports only the modules below it, so no import cycle can come back
(the runtime was three modules importing each other in a circle). Read from the sources' real import statements."""

from __future__ import annotations

import ast
import pathlib

import iokit.runtime

# Bottom first, as iokit/runtime/__init__.py lists them.
LAYERS = ["traps", "context", "scopes", "waits", "tasks", "sync", "drivers", "__init__"]
PACKAGE = pathlib.Path(iokit.runtime.__file__).parent


def _runtime_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) for each import of a sibling module that runs when ``path`` is imported (not those under
    ``if TYPE_CHECKING:``, which only annotations see)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                if child.module:
                    found.append((child.lineno, child.module.split(".")[0]))
                else:
                    found.extend((child.lineno, alias.name) for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def test_every_runtime_module_has_a_layer():
    modules = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert modules == sorted(LAYERS), "a module of iokit/runtime/ is missing from LAYERS (or LAYERS names a gone one)"


def test_each_runtime_module_imports_only_modules_below_it():
    upward = []
    for name in LAYERS:
        for line, target in _runtime_imports(PACKAGE / f"{name}.py"):
            if LAYERS.index(target) >= LAYERS.index(name):
                upward.append(f"iokit/runtime/{name}.py:{line} imports .{target}")
    assert not upward, upward

