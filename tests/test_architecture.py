"""The layers point one way (ARCHITECTURE.md, docs/architecture.md): CLI -> flows -> tasks ->
(probex_core, storage), settings at the bottom; scripts use public names only. Imports inside
functions count: a lazy import upward is still a dependency upward."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["probex", "flows", "tasks", "storage", "probex_core", "zoo"]
# What each layer may import of the project (itself always). The zoo builds the bundled lake from
# the science and the storage formats; the demo's tasks and the CLI call it.
ALLOWED = {
    "probex_core": {"probex_core"},
    "storage": {"probex_core", "storage"},
    "zoo": {"probex_core", "storage", "zoo"},
    "tasks": {"probex_core", "storage", "zoo", "tasks"},
    "flows": {"probex_core", "storage", "tasks", "zoo", "flows"},
    "probex": set(PACKAGES),
}
SETTINGS = "probex_core/settings.py"


def project_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import of a project package in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return [(line, mod, names) for line, mod, names in out if mod.split(".")[0] in PACKAGES]


def test_layers_import_only_downward():
    wrong = []
    for pkg, allowed in ALLOWED.items():
        for path in sorted((REPO / pkg).rglob("*.py")):
            for line, mod, _ in project_imports(path):
                if mod.split(".")[0] not in allowed:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_settings_import_nothing_of_the_project():
    assert project_imports(REPO / SETTINGS) == []


def test_probex_core_stays_pure():
    """No Prefect, Dask, LanceDB or network client in the science."""
    banned = {"prefect", "prefect_dask", "dask", "distributed", "lancedb", "lance", "httpx", "httpx2",
              "requests", "huggingface_hub", "urllib"}
    wrong = []
    for path in sorted((REPO / "probex_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            wrong += [f"{path.name}:{node.lineno} {m}" for m in mods if m.split(".")[0] in banned]
    assert not wrong, wrong


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py")))
def test_scripts_use_public_names(script):
    private = [f"{mod}.{n}" for _, mod, names in project_imports(REPO / "scripts" / script)
               for n in names if n.startswith("_")]
    assert not private, f"scripts/{script} reaches into private names: {private}"


def test_flows_orchestrate_and_tasks_hold_the_tasks():
    """A Prefect @task lives in tasks/, a @flow in flows/: the folder says what the code is."""
    def decorators(pkg: str) -> set[str]:
        found = set()
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for d in node.decorator_list:
                        d = d.func if isinstance(d, ast.Call) else d
                        found.add(getattr(d, "id", getattr(d, "attr", "")))
        return found

    assert "task" not in decorators("flows")
    assert "flow" not in decorators("tasks")
