"""Print the package-level import graph of autotp: one line per layer of the contract in
pyproject.toml (highest first), its modules, and the layers it imports.

    python docs/import_graph.py

docs/architecture.md shows its output; tests/test_architecture.py checks that the page
holds the current one and that the contract is kept (lint-imports)."""

from __future__ import annotations

from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def layers() -> list[list[str]]:
    """The contract's layers, highest first; independent layers share an entry."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    return [[name.strip() for name in entry.split("|")] for entry in contract["layers"]]


def picture() -> str:
    graph = grimp.build_graph("autotp", include_external_packages=False, cache_dir=None)
    names = [name for entry in layers() for name in entry]

    def layer_of(module: str) -> str | None:
        for name in names:
            if module == name or module.startswith(name + "."):
                return name
        return None

    width = max(len(n) for n in names) - len("autotp.")
    lines = [f"{'layer':<{width}}  files  imports from the layers"]
    for name in names:
        own = sorted(m for m in graph.modules if layer_of(m) == name)
        used = set()
        for module in own:
            for target in graph.find_modules_directly_imported_by(module):
                other = layer_of(target)
                if other is not None and other != name:
                    used.add(other)
        below = [n.removeprefix("autotp.") for n in names if n in used]
        lines.append(f"{name.removeprefix('autotp.'):<{width}}  {len(own):>5}  "
                     f"{', '.join(below) or '-'}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(picture())
