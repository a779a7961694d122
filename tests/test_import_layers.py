"""The package's import graph goes one way where the layout says so.

Every ``import`` and ``from ... import`` in the package is read from the source
(module level and inside functions alike: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mxguard"


def module_graph() -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` for the modules of the package."""
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in modules and c != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])
    return {(top(a), top(b)) for a, targets in graph.items() for b in targets if top(a) != top(b)}


def test_no_module_imports_itself_round_a_cycle():
    graph = module_graph()
    assert "mxguard.smtp.proxy" in graph and graph["mxguard.smtp.proxy"]
    assert cycles(graph) == []


def test_named_layers_go_one_way():
    edges = package_edges(module_graph())
    # The quarantine uses the services; the services do not reach up into the quarantine.
    assert ("mxguard.quarantine", "mxguard.services") in edges
    assert ("mxguard.services", "mxguard.quarantine") not in edges
    # The spool uses the SMTP delivery client; the SMTP proxy hands mail to the spool only
    # through the Spooler protocol it is given.
    assert ("mxguard.spool", "mxguard.smtp") in edges
    assert ("mxguard.smtp", "mxguard.spool") not in edges
    # The gateway's own mail is a module of its own; the name "outbound" is free for the relay.
    assert not (PACKAGE / "outbound.py").exists() and (PACKAGE / "own_mail.py").exists()


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_a_serving_process_does_not_load_the_acme_client():
    """The ACME client's libraries (acme, josepy, requests) cost a gateway process memory: the CLI,
    the gateway, the console and API routes and the ACME service import it only to order."""
    import subprocess
    import sys

    code = ("import sys; import mxguard.cli, mxguard.gateway, mxguard.services.acme; "
            "from mxguard.web import app; from mxguard.web.routes import tls, partners; "
            "from mxguard.web.routes.api_v1 import tls as api_tls; "
            "print(sorted(m for m in ('mxguard.tls.acme_client', 'acme', 'josepy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
