"""The project's size rules, read from the source with `ast`: no function over 80 lines and no file over 600 lines in
src/ (functions counted from `def` to their last line, docstring included)."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def long_functions(root: Path = SRC, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, str, int]]:
    """(file relative to src/, function name, lines) of every function or method longer than `limit` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append((rel, node.name, lines))
    return out


def long_files(root: Path = SRC, limit: int = MAX_FILE_LINES) -> list[tuple[str, int]]:
    """(file relative to src/, lines) of every Python file longer than `limit` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            out.append((path.relative_to(root).as_posix(), lines))
    return out


def test_no_function_over_80_lines():
    over = [f"src/{rel}: {name} has {n} lines" for rel, name, n in long_functions()]
    assert not over, "\n".join(over)


def test_no_file_over_600_lines():
    over = [f"src/{rel}: {n} lines" for rel, n in long_files()]
    assert not over, "\n".join(over)


def test_the_measures_count_what_they_say(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n    return 0\n")
    assert long_functions(tmp_path) == [("m.py", "long", 82)]
    assert long_files(tmp_path, limit=80) == [("m.py", 86)]
