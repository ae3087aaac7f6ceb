"""docs/guarantees.md names a test for every promise, and docs/cluster.md one for every way the
backplane can lose a message: each one they name exists."""

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
    check_rows(rows, DOC.name)


def test_every_way_the_cluster_backplane_can_lose_a_message_names_a_test_that_exists():
    """docs/cluster.md, "What the backplane can lose": each row's last cell names its tests."""
    section = (ROOT / "docs" / "cluster.md").read_text().split("\n## What the backplane can lose\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| What happens")]
    assert len(rows) >= 10
    assert all("`test_" in row.rsplit("|", 2)[1] for row in rows), [row[:60] for row in rows if "`test_" not in row.rsplit("|", 2)[1]]
    check_rows(rows, "cluster.md")


def check_rows(rows: list[str], doc: str) -> None:
    for row in rows:
        current = None
        for ref in re.findall(r"`(test_\w+\.py)?(?:::(\w+))?`", row):
            file, name = ref
            if file:
                current = file
                assert (ROOT / "tests" / file).exists(), f"{file} named in {doc} does not exist"
            assert current, f"a test name without its file: {row}"
            if name:
                assert name in functions_of(ROOT / "tests" / current), f"{current}::{name} named in {doc} does not exist"
