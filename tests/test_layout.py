"""The shape of the code, as the README's layout table states it: data flows one way (no module of
``gpt2/`` imports one listed below it, so there are no import cycles), and every function reads on
one screen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpt2"


def layers() -> dict[str, int]:
    """Each top-level module or sub-package of gpt2/ and its row in the README's layout table."""
    table = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    rank = {}
    for row, line in enumerate(l for l in table.splitlines() if l.startswith("| `gpt2/")):
        for path in re.findall(r"`gpt2/([\w/]+?)(?:\.py|/)?`", line.split("|")[1]):
            rank[path] = row
    return rank


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def gpt2_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpt2":
            names += [f"gpt2.{a.name}" for a in node.names] if node.module == "gpt2" else [node.module]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "gpt2"]
    return names


def test_every_module_is_in_the_layout_table_and_imports_only_layers_above_it() -> None:
    rank = layers()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = layer_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if me in ("", "__init__", "__main__"):
            continue
        assert me in rank, f"gpt2/{me} is missing from the README's layout table"
        for name in gpt2_imports(path):
            theirs = layer_of(name)
            if theirs in rank and theirs != me and rank[theirs] > rank[me]:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert upward == []


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if function and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == []


def module_imports(path: Path) -> set[str]:
    """The gpt2 modules that module ``path`` imports when it is itself imported (its top-level
    statements; imports inside functions run later, when called)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpt2":
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "gpt2"}
    return names


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between modules, inside a package as well as between packages."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in module_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join([*trail[trail.index(name):], name])}"
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
