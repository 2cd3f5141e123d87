"""The rules of docs/architecture.md that import-linter (run by ``make test``) does not check:
imports at module level only, no private name taken from another module, and modules under 600
lines unless their docstring says why. The source is read, not imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "voxreg"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 600
#: what a module docstring says when the module is kept longer than MAX_LINES on purpose
SIZE_REASON = "longer than 600 lines"

#: known exceptions, by file (relative to src/voxreg); an entry for a file that is gone is inert
KNOWN: dict[str, set[str]] = {}


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _is_module(dotted: str) -> bool:
    """Whether ``voxreg...`` names a module or package of the source tree."""
    base = SRC.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _allowed(path: Path, rule: str) -> bool:
    return rule in KNOWN.get(_name(path), set())


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to voxreg modules by the module's imports, e.g. ``T -> voxreg.transforms``."""
    aliases = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("voxreg.") and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if node.module.split(".")[0] == "voxreg" and _is_module(dotted):
                    aliases[alias.asname or alias.name] = dotted
    return aliases


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _local_imports(path: Path, tree: ast.Module) -> list[str]:
    return [
        f"line {inner.lineno}"
        for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node) if isinstance(inner, (ast.Import, ast.ImportFrom))
    ]


def _private_uses(path: Path, tree: ast.Module) -> list[str]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "voxreg":
            found += [f"line {node.lineno}: {alias.name}" for alias in node.names
                      if _private(alias.name) and not _is_module(f"{node.module}.{alias.name}")]
    aliases = _module_aliases(tree)
    found += [
        f"line {node.lineno}: {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and _private(node.attr)
    ]
    return found


def _violations(rule: str, check) -> list[str]:
    out = []
    for path in MODULES:
        found = check(path, ast.parse(path.read_text(), str(path)))
        if found and not _allowed(path, rule):
            out.append(f"{_name(path)}: {'; '.join(found)}")
    return out


def test_imports_at_module_level_only():
    """Only an optional heavy dependency may be imported inside a function."""
    bad = _violations("local imports", _local_imports)
    assert not bad, "imports inside functions (import at the top of the module):\n" + "\n".join(bad)


def test_no_private_name_from_another_module():
    """What another module needs gets a public name in the module that owns it."""
    bad = _violations("private names", _private_uses)
    assert not bad, "private names of other modules:\n" + "\n".join(bad)


def test_module_size():
    """Split a long module where there is a seam, or say in its docstring why it is kept whole."""

    def too_long(path: Path, tree: ast.Module) -> list[str]:
        lines = path.read_text().count("\n")
        if lines > MAX_LINES and SIZE_REASON not in (ast.get_docstring(tree) or ""):
            return [f"{lines} lines"]
        return []

    bad = _violations("size", too_long)
    assert not bad, f"modules over {MAX_LINES} lines without a reason:\n" + "\n".join(bad)
