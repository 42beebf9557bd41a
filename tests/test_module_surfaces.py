"""Each module of memsess (adapters included) takes from another only what that one's
``__all__`` offers: no private name crosses a module boundary, not even into a private
module's only user. Read from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_files() -> dict[str, Path]:
    """Every module's dotted name and its file, the adapters/ folder as memsess.adapters."""
    files = {}
    for folder, package in ((ROOT / "memsess", "memsess"), (ROOT / "adapters", "memsess.adapters")):
        for path in sorted(folder.rglob("*.py")):
            if path.is_relative_to(ROOT / "memsess" / "adapters"):  # the link, seen twice
                continue
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


MODULES = module_files()


def public_names(module: str) -> set[str]:
    """The names in ``module``'s ``__all__`` (a literal list), and its submodules."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    names = {name.rpartition(".")[2] for name in MODULES if name.rpartition(".")[0] == module}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            names |= set(ast.literal_eval(node.value))
    return names


def imported_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module ``node`` (in ``module``) imports from."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0]
    return f"{base}.{node.module}" if node.module else base


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_names_other_modules_export(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    borrowed = [
        (node.lineno, home, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (home := imported_from(module, node)) in MODULES
        and home != module
        for alias in node.names
    ]
    unexported = [
        f"line {line}: {home}.{name}"
        for line, home, name in borrowed
        if name not in public_names(home)
    ]
    assert unexported == []
