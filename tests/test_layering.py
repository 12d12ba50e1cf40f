"""The package's layering, read from the source with `ast` (every import, at module top or inside a function):

- `internvl.model` imports nothing from `internvl.train`, `internvl.data`, `internvl.demo` or `lab`;
- the modules of `internvl` import each other without a cycle;
- `medrega_eval` imports from `internvl` only the names that docs/contracts.md lists as its public API.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONTRACTS = ROOT / "docs" / "contracts.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    """Every module of `package` under src/: {dotted name: file}."""
    return {module_name(p): p for p in sorted((SRC / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in the file, relative ones resolved;
    `from pkg import sub` where pkg.sub is a module of `known` counts as importing pkg.sub."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [alias.name for alias in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found += [(sub, [], node.lineno) for sub in subs]
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest or not subs:
                found.append((base, rest, node.lineno))
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """{module: modules of the same package it imports}."""
    mods = modules(package)
    known = set(mods)
    return {name: {target for target, _, _ in imports_of(name, path, known) if target in known}
            for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_model_does_not_import_higher_layers():
    forbidden = ("internvl.train", "internvl.data", "internvl.demo", "lab")
    known = set(modules("internvl"))
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
           for name, path in modules("internvl").items() if name.startswith("internvl.model")
           for target, _, line in imports_of(name, path, known)
           if any(target == f or target.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_internvl_has_no_import_cycle():
    assert find_cycle(import_graph("internvl")) is None, " -> ".join(find_cycle(import_graph("internvl")))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def documented_eval_api() -> dict[str, set[str]]:
    """The `internvl` names that docs/contracts.md allows `medrega_eval` to import ({module: names})."""
    text = CONTRACTS.read_text(encoding="utf-8")
    section = re.search(r"<!-- medrega_eval API -->\n```text\n(.*?)```", text, re.S)
    assert section, f"{CONTRACTS}: the medrega_eval API list (a ```text block after <!-- medrega_eval API -->) is missing"
    api = {}
    for line in section.group(1).splitlines():
        module, _, names = line.partition(":")
        api[module.strip()] = {n.strip() for n in names.split(",") if n.strip()}
    return api


def test_medrega_eval_uses_only_the_documented_internvl_api():
    api = documented_eval_api()
    known = set(modules("internvl"))
    bad = []
    for name, path in modules("medrega_eval").items():
        for target, names, line in imports_of(name, path, known | set(modules("medrega_eval"))):
            if target != "internvl" and not target.startswith("internvl."):
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if not names:
                bad.append(f"{where}: `import {target}` (import the names: from {target} import ...)")
            for imported in names:
                if imported not in api.get(target, set()):
                    bad.append(f"{where}: {target}.{imported} is not in docs/contracts.md's medrega_eval API")
    assert not bad, "\n".join(bad)


def test_documented_eval_api_exists():
    for module, names in documented_eval_api().items():
        loaded = importlib.import_module(module)
        missing = [n for n in names if not hasattr(loaded, n)]
        assert not missing, f"docs/contracts.md lists {module}.{missing}, which do not exist"


@pytest.mark.parametrize("module,source,expected", [
    ("internvl.x_probe", "from . import regions\n", ("internvl.regions", [])),
    ("internvl.model.x_probe", "from ..ops.cross_entropy import causal_lm_loss\n",
     ("internvl.ops.cross_entropy", ["causal_lm_loss"])),
    ("internvl.model.x_probe", "from .chat import ChatMixin\n", ("internvl.model.chat", ["ChatMixin"])),
])
def test_relative_imports_resolve(tmp_path, module, source, expected):
    probe = tmp_path / "x_probe.py"
    probe.write_text(source)
    found = imports_of(module, probe, set(modules("internvl")))
    assert [(target, names) for target, names, _ in found] == [expected]
