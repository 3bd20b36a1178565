"""The layout rule: commands stand on shared ground, never on each other.

No CLI command module imports another CLI command module (only `app.py` gathers them), and no library command
module imports another library command module. Checked on the source with `ast`, so a function-level import
counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lora_cli

COMMANDS = ("demo", "diff", "extract", "inspect", "memory", "merge", "resize", "unmerge", "verify")
PACKAGE = Path(lora_cli.__file__).parent
ALLOWED: set[tuple[str, str]] = set()


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` imports, absolute or relative, anywhere in the file; `from a import b` gives a and a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sideways_imports(layer: str) -> list[str]:
    """'a imports b' for each command module of `layer` ("lora_cli" or "lora_cli.cli") importing a sibling command."""
    folder = PACKAGE.joinpath(*layer.split(".")[1:])
    commands = {f"{layer}.{name}" for name in COMMANDS}
    problems = []
    for name in COMMANDS:
        module = f"{layer}.{name}"
        for target in sorted(imported_modules(folder / f"{name}.py", layer) & (commands - {module})):
            if (module, target) not in ALLOWED:
                problems.append(f"{module} imports {target}")
    return problems


def test_every_command_module_is_where_the_rule_looks():
    for folder in (PACKAGE, PACKAGE / "cli"):
        assert all((folder / f"{name}.py").is_file() for name in COMMANDS)


@pytest.mark.parametrize("layer", ["lora_cli", "lora_cli.cli"])
def test_no_command_module_imports_another(layer):
    assert sideways_imports(layer) == []


def test_the_check_sees_each_form_of_import(tmp_path):
    lines = ["import lora_cli.merge", "from lora_cli import diff", "from . import unmerge", "def f():"]
    source = "\n".join([*lines, "    from .inspect import x", ""])
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = imported_modules(path, "lora_cli")
    assert {"lora_cli.merge", "lora_cli.diff", "lora_cli.unmerge", "lora_cli.inspect"} <= found
