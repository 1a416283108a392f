"""The layout shows the pipeline: every folder of autotp is a layer of the contract in
pyproject.toml, a module imports only from its own layer or the layers below it (checked
by import-linter), no modules import each other in a cycle, and docs/architecture.md
shows the current picture (docs/import_graph.py)."""

from __future__ import annotations

import ast
import importlib.util
import io
from contextlib import redirect_stdout
from pathlib import Path

import grimp
import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", REPO / "docs" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_layers_contract_is_kept() -> None:
    """lint-imports (import-linter) on pyproject.toml's contract: no import from a higher
    layer into a lower one, lazy imports inside functions included."""
    from importlinter.cli import lint_imports

    out = io.StringIO()
    with redirect_stdout(out):
        code = lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True)
    assert code == 0, out.getvalue()
    assert "1 kept, 0 broken" in out.getvalue()


def test_every_folder_is_a_layer_and_every_layer_exists() -> None:
    names = {name for entry in import_graph.layers() for name in entry}
    folders = {f"autotp.{p.parent.name}" for p in (REPO / "autotp").glob("*/__init__.py")}
    top = {f"autotp.{p.stem}" for p in (REPO / "autotp").glob("*.py") if p.stem != "__init__"}
    assert folders <= names, folders - names
    assert names <= folders | top, names - folders - top
    # the top-level modules are the public entry points only
    assert top == {"autotp.parallel", "autotp.__main__"}, top


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("autotp", include_external_packages=False, cache_dir=None)
    edges = nx.DiGraph()
    for module in graph.modules:
        edges.add_node(module)
        for target in graph.find_modules_directly_imported_by(module):
            edges.add_edge(module, target)
    cycles = list(nx.simple_cycles(edges))
    assert cycles == [], cycles[:5]


def _autotp_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "autotp" or m.startswith("autotp.")}


@pytest.mark.parametrize("folder", ["rules", "models"])
def test_rules_use_the_match_api_and_models_nothing_of_autotp(folder: str) -> None:
    """rules/ and models/ ship as autotp.rules and autotp.models from folders the contract
    cannot see: a rule imports only what `autotp.match` exports (what docs/rules.md
    shows a rule author), a reference model nothing of autotp."""
    allowed = {"autotp.match"} if folder == "rules" else set()
    for path in sorted((REPO / folder).glob("*.py")):
        assert _autotp_imports(path) <= allowed, (path.name, _autotp_imports(path))


def test_each_package_says_what_it_takes_and_gives_and_names_its_modules() -> None:
    for init in sorted((REPO / "autotp").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, init
        assert "Takes" in doc and "gives" in doc, init
        for module in init.parent.glob("*.py"):
            if module.stem != "__init__":
                assert module.stem in doc, (init, module.stem)


def test_the_architecture_page_shows_the_current_picture() -> None:
    page = (REPO / "docs" / "architecture.md").read_text()
    assert import_graph.picture() in page, "run python docs/import_graph.py and paste it"
