"""docs/guarantees.md names a test for every promise: each one it names exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "guarantees.md"


def functions_of(path: Path) -> set[str]:
    """The tests a file defines: test functions, and test cases bound to a test_ name."""
    tree = ast.parse(path.read_text())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    names |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    return {name for name in names if name.startswith("test_")}


def test_every_test_the_guarantees_name_exists():
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Promise") and "`test_" in line]
    assert len(rows) >= 20
    for row in rows:
        current = None
        for ref in re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", row):
            file, name = ref
            if file:
                current = file
                assert (ROOT / "tests" / file).exists(), f"{file} named in {DOC.name} does not exist"
            assert current, f"a test name without its file: {row}"
            if name:
                assert name in functions_of(ROOT / "tests" / current), f"{current}::{name} named in {DOC.name} does not exist"
