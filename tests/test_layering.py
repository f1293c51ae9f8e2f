"""How the packages hang together, read from the source (nothing imported or run):

- no import cycles among the modules of engines/, server/, export/, deploy/ and clients/, lazy
  (in-function) and type-checking imports included: a cycle hidden in a function is still two
  modules that each need the other;
- no module imports another module's private (``_name``) names;
- comments and docstrings explain why, not which issue: a reader of the code has no tracker.

(That engines/ and server/ never import torch or export/ is checked at run time, in a fresh
interpreter, by tests/engines/test_pipeline.py and tests/server/test_settings.py.)
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engines", "server", "export", "deploy", "clients")
TEXT_CHECKED = (*PACKAGES, "scripts", "tests")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import statement, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, _ in _imports(path):
            for target in (module, *(f"{module}.{n}" for n in names)):
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 40  # the packages were found
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names() -> None:
    ours = set(_modules()) | set(PACKAGES)
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {name} from {module}"
        for path in _modules().values()
        for module, names, line in _imports(path)
        if module in ours
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert offenders == []


_CITES_AN_ISSUE = re.compile(r"\bissue\s*#?\d+|\bthe issue\b|\bissue's\b|\(issue\b", re.IGNORECASE)


def test_comments_do_not_cite_issues() -> None:
    offenders = []
    for package in TEXT_CHECKED:
        for path in sorted((REPO / package).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            for token in tokenize.generate_tokens(io.StringIO(source).readline):
                if token.type in (tokenize.COMMENT, tokenize.STRING) and _CITES_AN_ISSUE.search(token.string):
                    if path.name == "test_layering.py" and "_CITES_AN_ISSUE" in token.line:
                        continue  # the pattern itself
                    offenders.append(f"{path.relative_to(REPO)}:{token.start[0]}: {token.string.strip()[:80]}")
    assert offenders == []
