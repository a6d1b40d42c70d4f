"""The package is a straight stack: every import, ``TYPE_CHECKING`` ones too, runs downward.

Each module has a layer; a module may import from its own layer or below,
never from above, and the import graph has no loop. A new module must be
given a layer here, which is the point: where it sits is a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "flask_errands"

#: Bottom to top. Lower layers never know the ones above them exist.
LAYERS: list[set[str]] = [
    {"status", "exceptions", "serialization", "durations", "signals", "config", "aio", "limits"},
    {
        "backends.base",
        "backends.urls",
        "backends.queries",
        "backends.wakeup",
        "backends.patience",
        "backends.steps",
        "backends.memory",
        "backends.sqlite",
        "backends.redis",
        "backends.redis_cluster",
        "backends.redis_sentinel",
        "backends.postgres",
        "backends.outbox",
        "backends.rabbitmq",
        "backends.brokered",
        "backends",
    },
    {"jobs", "context", "logs"},
    {"tasks", "outcomes", "transactions", "tracing"},
    {"schedules", "runner", "workflows"},
    {"worker", "scheduler"},
    {"service", "serving"},
    {"runtime"},
    {"admin", "process"},
    {
        "cli",
        "metrics",
        "dashboard",
        "dashboard.api",
        "dashboard.auth",
        "dashboard.blueprint",
        "dashboard.csrf",
        "dashboard.pages",
        "dashboard.params",
        "dashboard.present",
    },
    {"extension"},
    {""},  # the package's __init__: the public surface
]
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports, wherever the import statement sits."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [part for part in package if part]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                nested = f"{target}.{alias.name}" if target else alias.name
                found.add(nested if nested in LAYER_OF else target)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for full in names:
                if full == "flask_errands" or full.startswith("flask_errands."):
                    found.add(full.removeprefix("flask_errands").lstrip("."))
    found.discard(name)
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    assert sorted(set(MODULES) - set(LAYER_OF)) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_downward_only(name: str) -> None:
    upward = sorted(
        target for target in imports_of(MODULES[name]) if LAYER_OF[target] > LAYER_OF[name]
    )
    assert upward == [], f"{name or '__init__'} imports from above it: {upward}"


def test_the_import_graph_has_no_loop() -> None:
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            pytest.fail("import loop: " + " -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for target in graph[name]:
            # A package importing its own submodules is how it chooses one; not a loop.
            if not target.startswith(f"{name}.") or name == "":
                visit(target, [*trail, name])
        done.add(name)

    for name in graph:
        if name:
            visit(name, [])


def test_the_cli_never_calls_the_store_directly() -> None:
    """``flask errands`` goes through the admin API; only the URL is shown as it is."""
    tree = ast.parse(MODULES["cli"].read_text())
    touches = sorted(
        {
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ("backend", "eager_backend")
        }
    )
    assert touches == [], f"cli.py reaches the store at lines {touches}"
