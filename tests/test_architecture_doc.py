"""docs/architecture.md's module map names every source file of the broker package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = (".py", ".pyx", ".pxi", ".pxd", ".pyi")


def module_map() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return re.search(r"```\nbroker/\n(.*?)```", text, re.S).group(1)


def test_the_module_map_names_every_source_file():
    named = module_map()
    files = sorted(p for p in (ROOT / "broker").rglob("*") if p.suffix in SOURCES and "__pycache__" not in p.parts)
    assert files
    # a file is named by its name; a package's files by their names within the package's entry
    missing = [str(p.relative_to(ROOT)) for p in files if p.name not in named and p.name != "__init__.py"]
    assert not missing, f"docs/architecture.md's module map does not name: {missing}"
